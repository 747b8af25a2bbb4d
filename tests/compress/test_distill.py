import torch

from compress import distill, specs


def test_layer_choice_is_even_and_keeps_both_ends():
    assert distill.keep_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert distill.keep_layers(6, 3) == [0, 2, 5]


def test_training_brings_the_student_closer_to_the_teacher(make_tiny_llama):
    model = make_tiny_llama(layers=3, hidden=64)
    with torch.no_grad():  # a teacher with confident predictions, so that dropping layers costs something
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    blocks = torch.randint(0, 1000, (24, 32), generator=torch.Generator().manual_seed(0))
    config = distill.DistillConfig(layers=1, tokens=40 * 4 * 32, lr=3e-3)
    report = specs.apply_(model, specs.Spec((config,)), blocks=blocks)["distill-L1"]
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert report["loss_after"] <= 0.7 * report["loss_before"], report
    with torch.inference_mode():
        model.generate(blocks[:1, :4], max_new_tokens=3, do_sample=False)  # the KV cache works with the new depth


def test_a_bf16_student_trains_in_float32_and_returns_bf16(make_tiny_llama, monkeypatch):
    """AdamW's small updates vanish in bf16 weights (GPU models are bf16): the student trains in float32."""
    model = make_tiny_llama(layers=2, hidden=64).to(torch.bfloat16)
    seen = []
    real = torch.optim.AdamW

    def recording(params, **kw):
        params = list(params)
        seen.extend(p.dtype for p in params)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    blocks = torch.randint(0, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    report = distill.distill_(model, distill.DistillConfig(layers=1, tokens=2 * 4 * 16), blocks=blocks)
    assert seen and set(seen) == {torch.float32} and report["steps"] == 2
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
