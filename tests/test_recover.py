"""Recovery by distillation: the KL loss, LoRA merging, and that training moves toward the teacher."""

import copy

import pytest
import torch

from prunescope.pruning import recover
from prunescope.pruning.shrink import ShrinkConfig, make_plan, shrink_model
from prunescope.testing import tiny_family_model

WINDOWS = torch.randint(0, 384, (24, 16), generator=torch.Generator().manual_seed(2))


def test_kl_loss_is_the_mean_kl_per_position():
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    p, q = t.softmax(-1), s.softmax(-1)
    direct = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(recover.kl_loss(t, s)) == pytest.approx(float(direct), rel=1e-5)
    assert float(recover.kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_reproduces_the_hooked_model(family):
    """While attached, adapters change the outputs; after the merge the plain model gives the same."""
    model = tiny_family_model(family)
    ids = WINDOWS[:2]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with recover._lora(model, rank=4, seed=0) as params:
        with torch.no_grad():
            for p in params[1::2]:  # B starts at zero; give it values so the adapter matters
                p.normal_(0, 0.05)
            hooked = model(input_ids=ids).logits
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert (hooked - before).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, lr", [("lora", 1e-2), ("full", 1e-3)])
def test_distillation_lowers_the_kl_to_the_dense_model(mode, lr):
    """Four passes over 8 windows (8 steps of 4): the KL on those windows must fall clearly."""
    teacher = tiny_family_model("llama")
    config = ShrinkConfig(model="tiny", mlp=0.5, kv_groups=1, multiple_of=8, criterion="magnitude",
                          compensation="none", evaluate=False, latency_rounds=0)
    student, _, _ = shrink_model(copy.deepcopy(teacher), config, make_plan(config, teacher), None)
    windows = WINDOWS[:8]
    with torch.no_grad():
        start = float(recover.kl_loss(teacher(input_ids=windows).logits, student(input_ids=windows).logits))
    result = recover.distill(student, teacher, windows.repeat(4, 1), batch_size=4, mode=mode, lr=lr)
    with torch.no_grad():
        end = float(recover.kl_loss(teacher(input_ids=windows).logits, student(input_ids=windows).logits))
    assert result.steps == 8 and result.losses[-1] < result.losses[0]
    assert end < 0.6 * start
    assert all(p.requires_grad for p in student.parameters())  # flags restored after training


def test_lora_merges_into_bfloat16_weights_and_full_mode_refuses_them():
    teacher = tiny_family_model("llama")
    student = copy.deepcopy(teacher).to(torch.bfloat16)
    result = recover.distill(student, teacher.to(torch.bfloat16), WINDOWS[:8], batch_size=4, lr=1e-2)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16} and result.steps == 2
    from prunescope.errors import PrunescopeError

    with pytest.raises(PrunescopeError, match="full recovery .* needs float32 weights"):
        recover.distill(student, teacher, WINDOWS[:4], mode="full")
