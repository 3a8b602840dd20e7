"""Image helpers: the one resize method, pixel scaling, per-class sample and comparison grids.

The one resize
--------------
Every change of resolution in the pipeline (real 28/32 px images up to the
diffusion model's 128 px, generated 128 px images down to the classifier's
native size, synthetic folders of any size) goes through `resize_images`,
which uses Pillow's bicubic filter. Pillow's resize is ANTIALIASED: when
downsizing, its filter support widens with the scale factor, so every source
pixel contributes (an area-weighted low-pass), instead of sampling a few pixels
and aliasing. The paper's original code downsized with TensorFlow's bilinear
resize without antialiasing; clean-fid (Parmar et al., "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation", CVPR 2022) showed that such aliased
resizing changes FID and similar metrics noticeably, so numbers from the two
methods are not comparable. `RESIZE_METHOD` names ours and is recorded in
manifests and results files.

Example:
    >>> small = resize_images(images_128, 32)            # (N, 32, 32, 3) uint8
    >>> x = to_unit_float(small)                          # float32 in [0, 1]
    >>> save_image_grid(small, labels, spec.label_names, "grid.png", per_class=8)
    >>> save_comparison_grid(x_test, y_test, small, labels, spec.label_names, "real_vs_gen.png")
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from Utils.io import atomic_path

RESIZE_METHOD = "PIL bicubic (antialiased), uint8 per image"

# The minimum cell size in a sample grid: 8 px digits or 28 px MedMNIST images
# are upscaled (nearest neighbour, so pixels stay visible) to at least this.
_MIN_GRID_CELL = 64


def resize_images(images_uint8, size):
    """Resizes (N, H, W, C) uint8 images to (N, size, size, C) with the one antialiased method.

    C may be 1 or 3. Images already at the target size are returned unchanged (a copy).

    Example:
        >>> resize_images(np.zeros((2, 128, 128, 3), np.uint8), 32).shape
        (2, 32, 32, 3)
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"resize_images expects uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"resize_images expects (N, H, W, 1|3) images, got shape {images.shape}")
    size = int(size)
    n, height, width, channels = images.shape
    if (height, width) == (size, size):
        return images.copy()
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        out[i] = resize_one(images[i], size)
    return out


def resize_one(image_uint8, size):
    """Resizes one (H, W, C) uint8 image to (size, size, C); see `resize_images`."""
    image = np.asarray(image_uint8)
    if image.shape[:2] == (size, size):
        return image.copy()
    if image.shape[-1] == 1:
        resized = Image.fromarray(image[..., 0]).resize((size, size), Image.BICUBIC)
        return np.asarray(resized)[..., None]
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    return np.asarray(resized)


def resize_pil(image, size):
    """Resizes a PIL image to (size, size) with the one method (for decoders that hold PIL images)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.BICUBIC)


def to_unit_float(images_uint8):
    """uint8 [0, 255] → float32 [0, 1] (the classifier's input scaling, the paper's `x / 255`)."""
    return np.asarray(images_uint8, dtype=np.float32) / 255.0


def to_signed_float(images_uint8):
    """uint8 [0, 255] → float32 [-1, 1] (the diffusion model's pixel range)."""
    return np.asarray(images_uint8, dtype=np.float32) / 127.5 - 1.0


def to_uint8(images_float, value_range=(0.0, 1.0)):
    """float images in `value_range` → uint8, rounded and clipped."""
    low, high = value_range
    scaled = (np.asarray(images_float, dtype=np.float32) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _rgb_with_labels(images, labels, caller, what):
    """Checked (N, H, W, 1|3) uint8 images as RGB, and their (N,) labels."""
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{caller} expects (N, H, W, 1|3) uint8 {what}, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} {what} but {len(labels)} labels")
    return (np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images), labels


def save_image_grid(images_uint8, labels, label_names, path, per_class=8, title=None):
    """Writes a PNG with one row per class: the class name, then `per_class` of its images.

    The first `per_class` images of each class (in the order given) are shown;
    a class with none is drawn as an empty row marked "(none)". Tiny images are
    upscaled by an integer factor (nearest neighbour) to at least 64 px so they
    are legible. The write is atomic.

    Args:
        images_uint8: (N, H, W, C) uint8, C = 1 or 3.
        labels: (N,) integer labels.
        label_names: names of all classes, index = label.
        path: the PNG file to write.
        per_class: images per row.
        title: optional line of text above the grid.

    Example:
        >>> save_image_grid(x_test, y_test, spec.label_names, "real_test.png", per_class=10,
        ...                 title="digits: real test images")
    """
    images, labels = _rgb_with_labels(images_uint8, labels, "save_image_grid", "images")
    height, width = images.shape[1:3]
    scale = max(1, -(-_MIN_GRID_CELL // min(height, width)))  # ceil division
    cell_h, cell_w = height * scale, width * scale
    gap = 2

    font = _font(14)
    names = [f"{i}: {name}" for i, name in enumerate(label_names)]
    # Long names (MedMNIST's) are cut so the label column stays readable.
    names = [n if len(n) <= 40 else n[:39] + "…" for n in names]
    text_w = max(_text_width(font, n) for n in names) + 12 if names else 0
    title_h = 24 if title else 0
    rows = len(label_names)
    grid_w = text_w + per_class * (cell_w + gap) + gap
    grid_h = title_h + rows * (cell_h + gap) + gap

    canvas = Image.new("RGB", (grid_w, grid_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), str(title), fill="black", font=font)
    for row, name in enumerate(names):
        top = title_h + gap + row * (cell_h + gap)
        draw.text((6, top + cell_h // 2 - 8), name, fill="black", font=font)
        chosen = np.flatnonzero(labels == row)[:per_class]
        if len(chosen) == 0:
            draw.text((text_w + gap, top + cell_h // 2 - 8), "(none)", fill="gray", font=font)
        for col, index in enumerate(chosen):
            tile = Image.fromarray(images[index])
            if scale > 1:
                tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (text_w + gap + col * (cell_w + gap), top))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


# The comparison grid's spacing, in pixels: between tiles, and the band between
# the real and the generated half (a dark line runs down its middle).
COMPARISON_GAP = 2
COMPARISON_SEPARATOR = 16


def save_comparison_grid(real, real_labels, generated, generated_labels, label_names, path,
                         per_class=8, min_tile=96, title=None):
    """Writes a PNG comparing real and generated images class by class, large enough to judge by eye.

    One row per class: the class name, `per_class` real images, a separator
    band with a dark vertical line, then `per_class` generated images; "real"
    and "generated" head the two halves. Every tile is upscaled by one integer
    factor, nearest neighbour (pixels stay visible, nothing is smoothed), to
    at least `min_tile` px on its shorter side. The first `per_class` images
    of each class (in the order given) are shown; missing ones leave the tile
    white, and a half with none is marked "(none)". The write is atomic.

    Layout (what a reader of the file can rely on): the generated half ends at
    the right edge, the rows end at the bottom edge. With cell = the tile side,
    g = COMPARISON_GAP and s = COMPARISON_SEPARATOR, generated tile (row r,
    column c) has its top-left corner at
    x = width - per_class * (cell + g) + c * (cell + g),
    y = height - (rows - r) * (cell + g), and real tile (r, c) at
    x - per_class * (cell + g) - s.

    Args:
        real, generated: (N, H, W, C) uint8, C = 1 or 3, the same H and W.
        real_labels, generated_labels: (N,) integer labels.
        label_names: names of all classes, index = label.
        path: the PNG file to write.
        per_class: images per half-row.
        min_tile: the smallest tile side after upscaling.
        title: optional line of text above the grid.

    Example:
        >>> save_comparison_grid(x_test, y_test, x_gen, y_gen, spec.label_names,
        ...                      "figures/real_vs_generated.png", per_class=8,
        ...                      title="digits: real (left) vs generated (right)")
    """
    halves = []
    for name, images, labels in (("real", real, real_labels), ("generated", generated, generated_labels)):
        halves.append(_rgb_with_labels(images, labels, "save_comparison_grid", f"{name} images"))
    if halves[0][0].shape[1:3] != halves[1][0].shape[1:3]:
        raise ValueError(f"real images are {halves[0][0].shape[1:3]} but generated ones are "
                         f"{halves[1][0].shape[1:3]}; resize them to one size first (resize_images)")
    per_class = int(per_class)
    height, width = halves[0][0].shape[1:3]
    scale = max(1, -(-int(min_tile) // min(height, width)))  # ceil division
    cell_h, cell_w = height * scale, width * scale
    gap, sep = COMPARISON_GAP, COMPARISON_SEPARATOR
    half_w = per_class * (cell_w + gap)

    font = _font(14)
    names = [f"{i}: {name}" for i, name in enumerate(label_names)]
    names = [n if len(n) <= 40 else n[:39] + "…" for n in names]
    text_w = max((_text_width(font, n) for n in names), default=0) + 12
    title_h = 24 if title else 0
    header_h = 22
    rows = len(label_names)
    grid_w = text_w + gap + half_w + sep + half_w
    grid_h = title_h + header_h + gap + rows * (cell_h + gap)
    x_starts = (text_w + gap, text_w + gap + half_w + sep)

    canvas = Image.new("RGB", (grid_w, grid_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), str(title), fill="black", font=font)
    for x0, header in zip(x_starts, ("real", "generated")):
        draw.text((x0, title_h + 3), header, fill="black", font=font)
    line_x = x_starts[1] - sep // 2 - 1
    draw.rectangle([line_x, title_h, line_x + 1, grid_h - 1], fill=(60, 60, 60))
    for row, name in enumerate(names):
        top = title_h + header_h + gap + row * (cell_h + gap)
        draw.text((6, top + cell_h // 2 - 8), name, fill="black", font=font)
        for x0, (images, labels) in zip(x_starts, halves):
            chosen = np.flatnonzero(labels == row)[:per_class]
            if len(chosen) == 0:
                draw.text((x0, top + cell_h // 2 - 8), "(none)", fill="gray", font=font)
            for col, index in enumerate(chosen):
                tile = Image.fromarray(images[index])
                if scale > 1:
                    tile = tile.resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (x0 + col * (cell_w + gap), top))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text):
    left, _, right, _ = font.getbbox(text)
    return right - left
