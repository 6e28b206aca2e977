"""Parity of ``zsbir import sake`` with the SAKE authors' own code (issue 27, point 1).

    python benchmarks/sake_import_parity.py --authors /path/to/SAKE [--n 8] [--json OUT]

``--authors`` is a local checkout of github.com/qliu24/SAKE (the folder holding ``src/``);
its files are imported and run from there, never copied or edited. The script:

1. builds their ``CSEResnetModel_KDHashing('cse_resnet50', 64, 100)`` (``src/ResnetModel.py``)
   with random weights, seeded, and random BatchNorm statistics (so that eval-mode
   BatchNorm is not the identity), wrapped in ``nn.DataParallel`` as their scripts do;
2. writes it with their ``save_checkpoint`` (``src/train_cse_resnet_sketchy_ext.py``):
   ``{'epoch', 'arch', 'state_dict' ('module.' keys), 'best_acc1'}``;
3. imports the file with ``zsbir import sake --protocol sketchy_ext`` into a run directory;
4. embeds random sketches and photos with their ``get_features``
   (``src/test_cse_resnet_sketchy_zeroshot.py``: tag 0 for the sketch loader, 1, the
   default, for the photo loader; ``hashing(features(x, tag))``, L2-normalized) and with the
   imported run (``load_trained(RUN_DIR).model(x, domain)["embedding"]``, normalized; zsbir's
   bits 1 sketch / 0 photo), from the same normalized 224x224 tensors; and, end to end, from
   the same random uint8 images through each side's preprocessing (theirs: ``ToPILImage``,
   ``Resize([224, 224])``, ``ToTensor``, ``Normalize``; zsbir's: the run's eval transform);
5. prints the worst relative error ``max_i ||a_i - b_i|| / ||b_i||`` per domain, and, as a
   control, the error when the domain bits are swapped (it must be large, else the check
   could not see a wrong mapping).

Runtime shims (their code is run as it is; each shim changes only the environment):

- ``pretrained=False`` for their model (``cse_resnet50_hashing(pretrained=None)``): no
  ImageNet download; the weights are random anyway.
- Stub modules for packages their modules import but this check never uses:
  ``pretrainedmodels`` (only its ``__dict__`` is read, for argparse choices) and ``cv2``
  (their dataset classes, not used); a stub is installed only when the package is absent.
- ``.cuda()`` on tensors and modules is the identity while their code runs (their
  ``get_features`` calls it; this check runs on the CPU). Loading needs no
  ``map_location``: zsbir reads the file (``torch.load(map_location="cpu",
  weights_only=True)``).
- Their test script's module-level ``warnings.filterwarnings("error")`` is confined to the
  import (``warnings.catch_warnings``); ``args.pretrained = False`` is set on that module,
  as its command line default gives.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _stub_missing(names: list[str]) -> list[str]:
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    return stubbed


@contextlib.contextmanager
def _cuda_is_identity():
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved  # type: ignore[method-assign]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", required=True, type=Path,
                    help="local checkout of github.com/qliu24/SAKE (holds src/)")
    ap.add_argument("--n", type=int, default=8, help="sketches and photos each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    src = (args.authors / "src").resolve()
    if not (src / "ResnetModel.py").is_file():
        sys.exit(f"{args.authors}: no src/ResnetModel.py (a checkout of qliu24/SAKE?)")
    stubbed = _stub_missing(["pretrainedmodels", "cv2"])
    sys.path.insert(0, str(src))
    with warnings.catch_warnings():  # their test script turns every warning into an error
        import test_cse_resnet_sketchy_zeroshot as their_test  # type: ignore
        from ResnetModel import CSEResnetModel_KDHashing  # type: ignore[import-not-found]
        from test_cse_resnet_sketchy_zeroshot import get_features  # type: ignore
        from train_cse_resnet_sketchy_ext import save_checkpoint  # type: ignore
    their_test.args = argparse.Namespace(pretrained=False)

    torch.manual_seed(args.seed)
    model = CSEResnetModel_KDHashing("cse_resnet50", 64, 100, pretrained=False)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    dp = nn.DataParallel(model).eval()

    from click.testing import CliRunner

    from zsbir.cli import main as zsbir_main
    from zsbir.data.base import PHOTO, SKETCH
    from zsbir.engine.index import load_trained

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sketchy_kd1kdneg03sake1_f64" / "checkpoint.pth.tar"
        ckpt.parent.mkdir()
        save_checkpoint({"epoch": 1, "arch": "cse_resnet50", "state_dict": dp.state_dict(),
                         "best_acc1": torch.tensor(0.0)}, True, filename=str(ckpt))
        best = ckpt.parent / "model_best.pth.tar"
        res = CliRunner().invoke(zsbir_main, ["import", "sake", str(best), "--protocol",
                                              "sketchy_ext", "--out", str(Path(tmp) / "run")])
        if res.exit_code != 0:
            sys.exit(f"zsbir import failed: {res.output}")
        trained = load_trained(Path(tmp) / "run", device="cpu")

    torch.manual_seed(args.seed + 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    inputs = {"sketch": (torch.rand(args.n, 3, 224, 224) - mean) / std,
              "photo": (torch.rand(args.n, 3, 224, 224) - mean) / std}
    tags = {"sketch": 0, "photo": 1}  # their get_features: 0 for sketches, 1 (default) photos
    bits = {"sketch": SKETCH, "photo": PHOTO}
    figures: dict[str, float] = {}
    theirs: dict[str, torch.Tensor] = {}
    with _cuda_is_identity(), torch.no_grad():
        for dom, x in inputs.items():
            feats, _ = get_features([(x, torch.zeros(len(x), dtype=torch.long))], dp, tags[dom])
            theirs[dom] = torch.from_numpy(feats)
            ours = F.normalize(trained.model(x, torch.full((len(x),), bits[dom]))["embedding"])
            figures[f"{dom} tensors"] = _rel(ours, theirs[dom])
            swapped = F.normalize(trained.model(x, torch.full((len(x),), 1 - bits[dom]))
                                  ["embedding"])
            figures[f"{dom} control: domain bits swapped"] = _rel(swapped, theirs[dom])

        # end to end: the same uint8 images through each side's preprocessing
        import torchvision.transforms as T
        from PIL import Image

        tf = T.Compose([T.ToPILImage(), T.Resize([224, 224]), T.ToTensor(),
                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        rng = np.random.default_rng(args.seed)
        for dom in ("sketch", "photo"):
            imgs = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(args.n)]
            x = torch.stack([tf(a) for a in imgs])
            feats, _ = get_features([(x, torch.zeros(len(x), dtype=torch.long))], dp, tags[dom])
            ours = F.normalize(torch.from_numpy(trained.embed_images(
                [Image.fromarray(a) for a in imgs], bits[dom])))
            figures[f"{dom} images (with preprocessing)"] = _rel(ours, torch.from_numpy(feats))
    out = {"relative_error": figures, "n_per_domain": args.n, "seed": args.seed,
           "stubbed_modules": stubbed, "torch": torch.__version__}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    worst = max(v for k, v in figures.items() if "control" not in k)
    control = min(v for k, v in figures.items() if "control" in k)
    print(f"worst relative error {worst:.2e} (aim 1e-5); control (bits swapped) {control:.2e}")
    if worst > 1e-5 or control < 1e-3:
        sys.exit(1)


if __name__ == "__main__":
    main()
