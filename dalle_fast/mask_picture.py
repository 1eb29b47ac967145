"""Render a DALL-E attention mask and its tile layout to PNG, to see what each layer attends to.

python -m dalle_fast.mask_picture --kind column --text-len 32 --grid 16 16 --block 32 --out column.png
"""

import argparse

from . import masks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dalle_fast.mask_picture", description=masks.render.__doc__)
    ap.add_argument("--kind", choices=masks.KINDS, default="row")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    ap.add_argument("--kernel", type=int, default=11)
    ap.add_argument("--conv-variant", choices=masks.CONV_VARIANTS, default="clipped")
    ap.add_argument("--block", type=int, default=16, help="tile size of the layout shown")
    ap.add_argument("--pixel", type=int, default=2, help="pixels per mask element")
    ap.add_argument("--out", required=True, help="PNG file to write")
    args = ap.parse_args(argv)
    pic = masks.render(args.kind, args.text_len, *args.grid, block=args.block, kernel=args.kernel,
                 conv_variant=args.conv_variant, pixel=args.pixel)  # fmt: skip
    masks.write_png(args.out, pic)
    lay = masks.tile_layout(args.kind, args.text_len, *args.grid, block_m=args.block, block_n=args.block,
                      kernel=args.kernel, conv_variant=args.conv_variant)  # fmt: skip
    print(f"{args.out}: {args.kind} mask, L={lay.seq_len}, {args.block}x{args.block} tiles: "
          f"{(lay.classes == masks.FULL).sum().item()} full, {(lay.classes == masks.PARTIAL).sum().item()} partial, "
          f"{(lay.classes == masks.EMPTY).sum().item()} empty ({lay.computed_fraction:.1%} computed)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
