"""AveragedExport is the average of a.export() over the steps, through growths; AveragedModel over a wrapped model
is refused."""

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import growops
from growops import GrowopsError, GrowopsTypeError
from tests.archs import Arch
from tests.models import BufferNet, gpt_batch, tiny_gpt


@pytest.mark.parametrize("growth", ["interpolate", "stack"])
def test_the_ema_is_the_ema_of_the_export_through_growths(growth):
    torch.manual_seed(0)
    a = growops.apollo(tiny_gpt(6), stages=(1, 3, 6), stage_steps=(2, 4), growth=growth)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    ema = growops.AveragedExport(a, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    reference = AveragedModel(a.export(), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for t in range(6):
        a(**gpt_batch(seed=t)).loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
        ema.update_parameters(a)
        reference.update_parameters(a.export())
    assert type(ema.module) is type(a.export())
    for (name, p), q in zip(ema.module.state_dict().items(), reference.module.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    batch = gpt_batch(seed=9)
    assert torch.equal(ema.eval()(**batch).logits, reference.eval()(**batch).logits)


PER_LAYER = Arch(container="modulelist", loop="iterate", pattern="A", units=4, prefix="P", suffix="",
                 values=("buffer",), tuple_out=False)


@pytest.mark.parametrize("build", [BufferNet, PER_LAYER.build], ids=["batchnorm", "per-layer-buffer"])
def test_buffers_follow_the_export_and_per_layer_buffers_stay_their_slots(build):
    a = growops.apollo(build(), stages=(1, 4), stage_steps=(3,))
    swa = growops.AveragedExport(a, use_buffers=True)
    reference = AveragedModel(a.export(), use_buffers=True)
    for t in range(4):
        with torch.no_grad():
            for p in a.model.parameters():
                p.add_(0.1 * (t + 1))
        a.step()
        swa.update_parameters(a)
        reference.update_parameters(a.export())
    for (name, p), q in zip(swa.module.state_dict().items(), reference.module.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_averaged_model_of_a_wrapped_model_is_refused_and_averaged_export_checks_its_arguments():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,))
    for target in (a, a.model):
        with pytest.raises(GrowopsError, match=r"AveragedModel\(a\) \(or of a.model\) would average the model's "
                                               r"physical slots.*Use growops.AveragedExport\(a, ...\)"):
            AveragedModel(target)
    copy.deepcopy(a)  # other copies are fine
    with pytest.raises(GrowopsTypeError, match="AveragedExport averages a growops.apollo wrapper, got a GPT"):
        growops.AveragedExport(tiny_gpt(4))
    ema = growops.AveragedExport(a)
    with pytest.raises(GrowopsTypeError, match="takes the apollo wrapper `a`, got a GPT"):
        ema.update_parameters(a.model)
