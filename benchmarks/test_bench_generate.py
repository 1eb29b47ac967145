"""pytest wrapper of the generate family suite (harness.pytest_family: one test per case); environment as in
benchmarks/test_bench_dvae.py."""

from . import generate, harness

SETTINGS = generate.settings_from_env()
CASES = generate.cases(SETTINGS["device"], smoke=SETTINGS["smoke"], quick=SETTINGS["quick"])
suite, test_generate = harness.pytest_family(generate, SETTINGS, CASES)


def test_plain_dense_peer_decodes_like_the_model(monkeypatch):
    """The plain-PyTorch peer computes the model's distribution: with torch.multinomial replaced by the argmax,
    it decodes the model's greedy images (fp32, CPU, fresh random weights)."""
    import torch

    from dalle_fast.nn import DALLE, DALLEConfig

    torch.manual_seed(0)
    model = DALLE(DALLEConfig.tiny(n_layers=3, grid_h=3, grid_w=5, text_len=6)).eval()
    with torch.no_grad():
        for p in model.parameters():  # O(1) activations at every layer, biases too: never zeros
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
    text = torch.randint(0, model.config.text_vocab, (3, model.config.text_len))
    argmax = lambda probs, n, generator=None: probs.argmax(-1, keepdim=True)  # noqa: E731
    monkeypatch.setattr(torch, "multinomial", argmax)
    got = generate.plain_dense_generate(model, text, seed=0)()
    want = model.generate(text, top_k=1, seed=0, backend="eager").flatten(1)
    assert got.shape == want.shape and torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 1  # not a constant image
