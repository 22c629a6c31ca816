"""`visae models show SPEC`: what a backbone looks like to visae (layout, sizes), as JSON.

Useful before adding a model entry: it checks the architecture name, the weights and the token
layout that extraction will write, without extracting anything.
"""

from __future__ import annotations

import argparse
import json

from visae.args import positive_int


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("models")
    sub = parser.add_subparsers(dest="models_command", metavar="<subcommand>", required=True)
    show = sub.add_parser("show", help="load a backbone and print its token layout as JSON")
    show.add_argument("spec", metavar="SPEC",
                      help="SOURCE:ARCH[@TAG], e.g. open_clip:ViT-B-16@openai, "
                           "timm:vit_base_patch14_reg4_dinov2.lvd142m; no tag = random init")
    show.add_argument("--weights", metavar="PATH", default=None, help="local weights file")
    show.add_argument("--image-size", metavar="N", type=positive_int, default=None, help="input resolution")
    show.set_defaults(func=cmd_models_show)


def cmd_models_show(args: argparse.Namespace) -> int:
    from visae.models import load_backbone, parse_model_arg

    spec = parse_model_arg(args.spec)
    spec["weights"] = args.weights
    spec["image_size"] = args.image_size
    backbone = load_backbone(spec)
    print(json.dumps(backbone.to_dict(), indent=2))
    return 0
