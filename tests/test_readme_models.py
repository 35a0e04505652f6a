"""The README's API example runs; every model builds and trains one step."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ffebm
import models
from models.published import ALIASES as PUBLISHED_ALIASES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    res = ns["res"]
    ep, unrolled = res.methods()
    assert ep.startswith("EP") and unrolled.startswith("Unrolled")
    # the example is seeded: EP(0.05) in float32 gives 0.89-0.97 per parameter; Unrolled ~ Implicit
    assert res.min_cosine(ep) > 0.85 and res.max_rel_error(unrolled) < 1e-4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ns["model"].parameters())


ALIASES = set(PUBLISHED_ALIASES)


@pytest.mark.parametrize("name", [n for n in models.available() if n not in ALIASES])
def test_every_model_builds_and_trains_one_step(name):
    torch.manual_seed(0)
    digits = name in ("digits", "digits_conv", "digits_mlp", "dhn_digits")
    if digits:
        m = models.build(name)
        x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    else:
        cfg = models.published(name) if name in models.PUBLISHED else models.preset(name)
        m = models.build(name, t1=2, t2=2, image_size=16)
        x, y = torch.rand(2, 3, 16, 16), torch.randint(0, cfg["num_classes"], (2,))
    with ffebm.loss_nudge(m, nn.functional.cross_entropy, y):  # the published last block is nudged by the loss
        out = m(x)
    assert out.shape == (x.shape[0], 10 if digits else cfg["num_classes"])
    nn.functional.cross_entropy(out, y).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    blocks = list(ffebm.energy_blocks(m))
    if name == "digits_mlp":   # the feedforward baseline: no energy block
        assert not blocks
        return
    assert blocks and all(b.stats is not None for _, b in blocks)


def test_building_does_not_mutate_presets():
    for name, get in (("cifar100_l15_6blocks", models.preset), ("splitting_small_3block", models.published)):
        before = get(name)
        models.build(name, t1=3, beta=0.1)
        assert get(name) == before


def test_readme_points_only_at_files_the_repository_has():
    """A path the README names (``models/published.py``, ``shared/...``) or a bare ``NAME.md`` is a
    file a user of this repository has; facts from elsewhere are stated or cited, not pointed at."""
    text = (ROOT / "README.md").read_text()
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} | {"shared"}
    missing = []
    for tok in re.findall(r"`([^`\s]+)`", text):
        path = tok.split("::")[0].rstrip(".,;:")
        first = path.split("/")[0]
        if "/" in path and first in tops and not any(c in path for c in "<>*{}"):
            if not (ROOT / path).exists():
                missing.append(path)
        elif re.fullmatch(r"[A-Za-z0-9_.-]+\.md", path) and not list(ROOT.rglob(path)):
            missing.append(path)
    for name in ("PRESETS.md", "ANCHORS.md"):  # reference notes that are not part of the repository
        if name in text and not list(ROOT.rglob(name)):
            missing.append(name)
    assert not missing, f"README names files this repository does not have: {sorted(set(missing))}"
