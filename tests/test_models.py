"""Loading models and mapping their image tokens back to the patches a box covers."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vheads.models import ModelError, load
from vheads.models.geometry import GeometryError


def painted(width, height, box):
    """A black image with `box` painted pure red."""
    img = Image.new("RGB", (width, height), "black")
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    return img


def red_fraction(pixel_values, processor):
    """Per-pixel redness of processed pixel values [3, H, W] (undoing the normalisation)."""
    mean = np.array(processor.image_processor.image_mean)[:, None, None]
    std = np.array(processor.image_processor.image_std)[:, None, None]
    rgb = pixel_values.float().numpy() * std + mean
    return (rgb[0] > 0.5) & (rgb[1] < 0.3)


@pytest.mark.parametrize("family,size,box", [
    ("llava", (40, 24), (4, 2, 20, 14)),
    ("llava", (24, 60), (0, 30, 24, 60)),
    ("vipllava", (64, 32), (20, 0, 44, 16)),
    ("llava_next", (64, 32), (8, 8, 30, 24)),
    ("llava_next", (30, 70), (2, 40, 28, 68)),
])
def test_region_mask_marks_exactly_the_patches_the_box_paints(model_dirs, family, size, box):
    loaded = load(model_dirs(family))
    image = painted(*size, box)
    inputs = loaded.adapter.encode([loaded.adapter.prompt("what is in the image ?")], [[image]])
    grid = loaded.adapter.token_grids([[image]], inputs)[0]
    region = grid.overlaps(box)
    pixels = inputs["pixel_values"][0]
    pixels = pixels if pixels.dim() == 4 else pixels[None]
    patch = loaded.model.config.vision_config.patch_size
    for token in range(len(grid)):
        if grid.tile[token] < 0:
            assert not region[token]
            continue
        r, c = grid.row[token], grid.col[token]
        red = red_fraction(pixels[grid.tile[token]], loaded.processor)[r * patch:(r + 1) * patch,
                                                                       c * patch:(c + 1) * patch]
        if red.mean() > 0.5:
            assert region[token], f"token {token} is red but outside the region"
        if not red.any():
            assert not region[token], f"token {token} has no red but is in the region"
    mask = loaded.adapter.region_mask([[image]], inputs, [box])
    assert int(mask.sum()) == int(region.sum()) > 0


def test_token_grid_boxes_cover_the_image(model_dirs):
    loaded = load(model_dirs("llava_next"))
    image = Image.new("RGB", (64, 32))
    inputs = loaded.adapter.encode([loaded.adapter.prompt("what ?")], [[image]])
    grid = loaded.adapter.token_grids([[image]], inputs)[0]
    base = grid.boxes[grid.tile == 0]
    assert base[:, [0, 1]].min() == pytest.approx(0) and base[:, 2].max() == pytest.approx(64)
    tiles = grid.boxes[grid.tile > 0]
    assert tiles[:, 0].min() >= -1e-6 and tiles[:, 2].max() <= 64 + 1e-6
    assert (grid.tile == -1).sum() > 0, "anyres rows end with newline tokens"


def test_generic_models_without_known_geometry_say_so(model_dirs):
    loaded = load(model_dirs("llava"))
    from vheads.models.families import Adapter

    generic = Adapter(loaded.model, loaded.processor)
    image = Image.new("RGB", (32, 32))
    inputs = generic.encode([generic.prompt("what ?")], [[image]])
    with pytest.raises(GeometryError, match="does not know"):
        generic.token_grids([[image]], inputs)


def test_load_reports_bad_paths_in_one_line(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="has no config.json"):
        load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load(tmp_path / "weights.bin")


def test_load_rejects_an_unknown_dtype_before_loading(model_dirs):
    with pytest.raises(ModelError, match="unknown --dtype"):
        load(model_dirs("llava"), dtype="float8")


def test_load_refuses_pickle_weights(model_dirs, tmp_path):
    import shutil

    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(model_dirs("llava"), folder)
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="holds only pickle weights"):
        load(folder)


def test_the_same_folder_loads_with_its_family_adapter(model_dirs):
    assert load(model_dirs("llava")).family == "llava"
    assert load(model_dirs("llava_next")).family == "llava_next"
    assert load(model_dirs("vipllava")).family == "vipllava"
    assert load(model_dirs("gemma3")).family == "gemma3"


def test_a_model_without_an_image_token_is_refused(model_dirs):
    from vheads.models import adapter_for

    loaded = load(model_dirs("llava"))
    loaded.model.config.image_token_id = None
    with pytest.raises(ModelError, match="has no image token"):
        adapter_for(loaded.model, loaded.processor)


def test_a_folder_without_a_processor_is_refused(model_dirs, tmp_path):
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model_dirs("llava") / name, folder / name)
    with pytest.raises(ModelError, match="processor"):
        load(folder)
