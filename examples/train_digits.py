"""Train the small ViT digit classifier that ships with vitnp as ``bundled:digits``.

Data: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``, 1,797 real
8x8 scans, ink 0..16), so training and the tests need no network. Each scan is rendered the
way a user would hand it to a classifier: a 32x32 RGB image (see ``render_digit``). The model
is trained on exactly what inference sees: rendered uint8 image -> the shipped
preprocessor_config.json, applied by transformers' PIL image processor.

    python examples/train_digits.py --out vitnp/bundled/digits --examples examples/digits

Needs the ``train`` extra (scikit-learn, transformers, torch). ``render_digit`` and
``heldout_split`` import neither torch nor transformers, so tests can use them cheaply.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
INK_MAX = 16  # load_digits counts ink per 8x8 cell in 0..16
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2

# Hub ImageProcessor form; the training pipeline reads this same file back.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

MODEL_SHAPE = dict(
    image_size=IMAGE_SIZE,
    patch_size=4,
    num_channels=3,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.0,
)


def render_digit(arr8x8) -> Image.Image:
    """An 8x8 load_digits scan (0..16) as a 32x32 RGB image: white ink on black, like MNIST."""
    ink = np.asarray(arr8x8, dtype=np.float64).reshape(8, 8)
    gray = np.rint(np.clip(ink, 0, INK_MAX) * (255.0 / INK_MAX)).astype(np.uint8)
    small = Image.fromarray(gray)
    return small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    return train_test_split(
        digits.images, digits.target, indices,
        test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=digits.target,
    )


def train_split():
    """(images8x8, labels, dataset indices) of the training part of the fixed split."""
    x_train, _, y_train, _, i_train, _ = _split()
    return x_train, y_train, i_train


def heldout_split():
    """(images8x8, labels, dataset indices) of the held-out part of the fixed split."""
    _, x_test, _, y_test, _, i_test = _split()
    return x_test, y_test, i_test


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Small random rotation, scale and shift: handwriting varies, the 32x32 frame does not."""
    angle = np.deg2rad(rng.uniform(-12.0, 12.0))
    scale = rng.uniform(0.9, 1.1)
    shift_x, shift_y = rng.uniform(-2.5, 2.5, size=2)
    c = (IMAGE_SIZE - 1) / 2.0
    # PIL maps each output pixel back to an input pixel, so this is the inverse transform.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    a, b = cos, sin
    d, e = -sin, cos
    xo, yo = c + shift_x, c + shift_y
    coeffs = (a, b, c - a * xo - b * yo, d, e, c - d * xo - e * yo)
    return image.transform(image.size, Image.Transform.AFFINE, coeffs,
                           resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def _pixel_values(processor, images):
    import torch

    return torch.from_numpy(np.stack(processor(images=images)["pixel_values"])).float()


def _accuracy(model, processor, images, labels) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=_pixel_values(processor, images)).logits
    return float((logits.argmax(-1).numpy() == np.asarray(labels)).mean())


def _write_examples(examples_dir: Path, images8x8, labels, indices) -> list[Path]:
    """One held-out digit per class (the first in split order), named by its label and dataset index."""
    examples_dir.mkdir(parents=True, exist_ok=True)
    for old in examples_dir.glob("digit-*-idx*.png"):
        old.unlink()
    written = []
    for digit in range(10):
        k = int(np.flatnonzero(np.asarray(labels) == digit)[0])
        path = examples_dir / f"digit-{digit}-idx{int(indices[k]):04d}.png"
        render_digit(images8x8[k]).save(path)
        written.append(path)
    return written


MODEL_CARD = """\
# bundled:digits: a small ViT for handwritten digits

A `ViTForImageClassification` trained from scratch by `examples/train_digits.py`, shipped with
vitnp so the library, CLI and server can be demonstrated and tested offline.

- Data: scikit-learn's `load_digits` (1,797 real 8x8 scans of handwritten digits, UCI ML
  hand-written digits). Each scan is rendered as a 32x32 RGB PNG: ink 0..16 scaled to 0..255
  (white ink on black), upscaled with PIL bilinear (`render_digit` in the script).
- Split: `train_test_split(test_size=0.2, random_state=0, stratify=y)`: {n_train} training,
  {n_test} held-out images. Seed {seed}, {epochs} epochs with light random affine augmentation.
- Model: image 32, patch 4, hidden 64, 4 layers, 4 heads, MLP 128; {n_params:,} parameters,
  float32 safetensors ({size_kb:.0f} KB). Labels "0".."9".
- Preprocessing (preprocessor_config.json): resize to 32x32 (bilinear), rescale 1/255,
  normalize mean 0.5 std 0.5.
- Held-out accuracy (transformers): {accuracy:.4f} ({n_correct}/{n_test}).
- Training time: {train_seconds:.0f} s on {threads} CPU threads (torch {torch_version},
  transformers {transformers_version}).

Made with:

    {command}

Works best on images like the training data: one centred digit, light on dark. Dark-on-light
photos of digits should be inverted first.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("vitnp/bundled/digits"))
    parser.add_argument("--examples", type=Path, default=Path("examples/digits"))
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tune", action="store_true",
                        help="hold out 20%% of the training part for validation and write nothing; "
                             "for choosing hyperparameters without looking at the held-out split")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    x_train, y_train, _ = train_split()
    x_eval, y_eval, i_eval = heldout_split()
    if args.tune:
        from sklearn.model_selection import train_test_split

        x_train, x_eval, y_train, y_eval = train_test_split(
            x_train, y_train, test_size=0.2, random_state=args.seed, stratify=y_train)

    args.out.mkdir(parents=True, exist_ok=True)
    preprocessor_path = args.out / "preprocessor_config.json"
    if not args.tune:
        preprocessor_path.write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
        processor = transformers.ViTImageProcessorPil.from_pretrained(args.out)
    else:
        processor = transformers.ViTImageProcessorPil(
            **{k: v for k, v in PREPROCESSOR_CONFIG.items() if k != "image_processor_type"})

    train_images = [render_digit(x) for x in x_train]
    eval_images = [render_digit(x) for x in x_eval]
    train_labels = torch.as_tensor(np.asarray(y_train), dtype=torch.long)

    id2label = {i: str(i) for i in range(10)}
    config = transformers.ViTConfig(**MODEL_SHAPE, id2label=id2label,
                                    label2id={v: k for k, v in id2label.items()})
    model = transformers.ViTForImageClassification(config)
    n_params = sum(p.numel() for p in model.parameters())

    steps_per_epoch = -(-len(train_images) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    shuffler = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        pixels = _pixel_values(processor, [augment(im, rng) for im in train_images])
        order = torch.randperm(len(train_images), generator=shuffler)
        total = 0.0
        for s in range(steps_per_epoch):
            batch = order[s * args.batch_size:(s + 1) * args.batch_size]
            loss = loss_fn(model(pixel_values=pixels[batch]).logits, train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            acc = _accuracy(model, processor, eval_images, y_eval)
            print(f"epoch {epoch + 1:3d}  loss {total / len(train_images):.4f}  "
                  f"{'val' if args.tune else 'held-out'} acc {acc:.4f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    train_seconds = time.perf_counter() - start
    print(f"train time {train_seconds:.1f} s, {n_params:,} parameters")

    if args.tune:
        print(f"validation accuracy {_accuracy(model, processor, eval_images, y_eval):.4f}")
        return 0

    model.eval()
    model.save_pretrained(args.out)
    reloaded = transformers.ViTForImageClassification.from_pretrained(args.out)
    accuracy = _accuracy(reloaded, processor, eval_images, y_eval)
    n_correct = int(round(accuracy * len(y_eval)))
    size_kb = (args.out / "model.safetensors").stat().st_size / 1024
    print(f"held-out accuracy {accuracy:.4f} ({n_correct}/{len(y_eval)}), "
          f"model.safetensors {size_kb:.0f} KB")

    command = (f"python examples/train_digits.py --out {args.out} --examples {args.examples} "
               f"--epochs {args.epochs} --seed {args.seed}")
    if args.lr != parser.get_default("lr") or args.batch_size != parser.get_default("batch_size"):
        command += f" --lr {args.lr} --batch-size {args.batch_size}"
    (args.out / "README.md").write_text(MODEL_CARD.format(
        n_train=len(y_train), n_test=len(y_eval), seed=args.seed, epochs=args.epochs,
        n_params=n_params, size_kb=size_kb, accuracy=accuracy, n_correct=n_correct,
        train_seconds=train_seconds, threads=args.threads, torch_version=torch.__version__,
        transformers_version=transformers.__version__, command=command))
    for path in _write_examples(args.examples, x_eval, y_eval, i_eval):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
