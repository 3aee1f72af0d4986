"""What each model's hash layer sees at the start of training: a diagnostic for the learning rate.

For every model, freshly built with the offline ImageNet weights (seed 0) and put in the state
the `fast` preset trains it in (training mode, frozen trunk in eval mode), this encodes a spread
of images and prints, for the features that the hash layer multiplies:

- the feature dimension and the mean squared norm ||x||²: one SGD step on a bias-free linear
  layer moves a logit by about lr · ||x||² times its gradient, so at one nominal learning rate a
  larger norm is a proportionally larger effective step;
- the mean pairwise cosine between images: near 1 means every image points the same way, and
  the codes can only differ by the small remainder (a collapse risk).

Usage: python benchmarks/hash_inputs.py [--data ../shared/data/cub100] [--images 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fgh_deploy  # noqa: E402
from fgh_deploy.images import list_images, load_image  # noqa: E402


def main() -> None:
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data, help="image folder")
    parser.add_argument("--images", type=int, default=12, help="images, spread over the folder's listing")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    names = list_images(args.data)
    names = names[:: max(1, len(names) // args.images)][: args.images]
    print(f"{'model':8s} {'dim':>5s} {'mean ||x||^2':>12s} {'mean pairwise cosine':>20s}")
    for name in fgh_deploy.list_models():
        torch.manual_seed(0)
        model = fgh_deploy.build_model(name, args.bits, backbone=args.backbone, pretrained=True)
        model.train()
        model.trunk.eval()
        images = torch.stack([load_image(args.data / n, model.preprocess) for n in names])
        with torch.no_grad():
            features = model.encode_features(model.normalize(images))
        if isinstance(features, tuple):  # SEMICON: (global, parts) → what its hash heads see, side by side
            glob, parts = features
            features = torch.cat([glob, *parts], dim=1)
        cosine = torch.nn.functional.cosine_similarity(features[:, None], features[None], dim=-1)
        off_diagonal = cosine[~torch.eye(len(features), dtype=torch.bool)].mean()
        print(f"{name:8s} {features.shape[1]:5d} {features.pow(2).sum(1).mean():12.1f} {off_diagonal:20.3f}")


if __name__ == "__main__":
    main()
