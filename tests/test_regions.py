"""Region geometry of every family with a box-able image layout: a box painted red must light exactly the image
tokens whose pixels (in the processor's own `pixel_values`) hold it, for tiles, crops, thumbnails, several sizes
and aspect ratios, and several images in one prompt."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_regions import REGION_BUILDERS
from transformers.image_processing_utils import select_best_resolution

from vheads.models import load
from vheads.models.geometry import GeometryError, TokenGrid

TILED = ("internvl", "llava_onevision", "smolvlm", "idefics3")
SINGLE = ("paligemma", "gemma3", "mistral3", "llava_pixtral", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v")
SIZES = [((70, 30), (40, 4, 66, 20)), ((30, 90), (2, 50, 20, 88)), ((48, 48), (10, 10, 30, 34)),
         ((130, 60), (5, 30, 60, 58))]


@pytest.fixture(scope="module")
def folders(model_dirs, tmp_path_factory):
    """family -> tiny model folder: the family builders, and the extra region-test models of `tiny_regions`."""
    built = {}

    def get(family):
        if family not in REGION_BUILDERS:
            return model_dirs(family)
        if family not in built:
            built[family] = REGION_BUILDERS[family](tmp_path_factory.mktemp(family))
        return built[family]

    return get


def painted(width, height, box):
    """A black image with `box` painted pure red."""
    img = Image.new("RGB", (width, height), "black")
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 0, 0))
    return img


def redness(frame, processor):
    """Bool [H, W]: the red pixels of one processed frame [3, H, W] (normalisation undone)."""
    ip = processor.image_processor
    mean = np.array(ip.image_mean, dtype=np.float64)[:, None, None]
    std = np.array(ip.image_std, dtype=np.float64)[:, None, None]
    rgb = frame.double().numpy() * std + mean
    return (rgb[0] > 0.5) & (rgb[1] < 0.3)


def qwen_frame(patches, thw, ip):
    """The [3, H, W] image that Qwen2-VL-style flattened patches [t*h*w, 3*tp*p*p] of one image were cut from."""
    t, h, w = (int(v) for v in thw)
    p, m, tp = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    x = patches.reshape(t, h // m, w // m, m, m, 3, tp, p, p)[0, :, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)


def frames_per_image(family, inputs, images, processor):
    """Per batch row, per image: the list of its processed frames [3, H, W] in processor order."""
    pv = inputs["pixel_values"]
    out, flat = [], 0
    for row, row_images in enumerate(images):
        per_row, inner = [], 0
        for _ in row_images:
            if family == "internvl":
                n = int(inputs["_tiles"][flat])
                per_row.append(list(pv[inputs["_first"][flat]: inputs["_first"][flat] + n]))
            elif family in ("smolvlm", "idefics3"):
                n = int(inputs["_tiles"][flat])
                per_row.append(list(pv[row][inner: inner + n]))
                inner += n
            elif family == "llava_onevision":
                per_row.append(list(pv[flat]))
            elif family in ("paligemma", "gemma3", "mistral3", "llava_pixtral"):
                per_row.append([pv[flat]])
            else:
                thw = inputs["image_grid_thw"]
                start = int(thw[:flat].prod(dim=1).sum())
                per_row.append([qwen_frame(pv[start: start + int(thw[flat].prod())], thw[flat],
                                           processor.image_processor)])
            flat += 1
        out.append(per_row)
    return out


def anyres_canvas(frames, image, processor):
    """OneVision: the anyres tiles (frames 1..) put back together into the padded canvas they were cut from."""
    ip = processor.image_processor
    best_h, best_w = select_best_resolution((image.height, image.width), ip.image_grid_pinpoints)
    tile = frames[0].shape[-1]
    cols = best_w // tile
    canvas = torch.zeros(3, best_h, best_w)
    for i, frame in enumerate(frames[1: 1 + (best_h // tile) * cols]):
        r, c = divmod(i, cols)
        canvas[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = frame
    return canvas, cols, tile


def check_grid(grid: TokenGrid, frames, image, box, processor, anyres: bool):
    """Every token with a patch: red over half its pixels -> in the region; no red pixel -> outside it; the
    reddest token is in the region."""
    region = grid.overlaps(box)
    canvas = cols = tile = None
    if anyres and len(frames) > 1:
        canvas, cols, tile = anyres_canvas(frames, image, processor)
        canvas_red = redness(canvas, processor)
    reds = [redness(f, processor) for f in frames]
    fractions = np.zeros(len(grid))
    for k in range(len(grid)):
        if grid.tile[k] < 0:
            assert not region[k]
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in grid.pixels[k])
        if canvas is not None and grid.tile[k] > 0:
            r, c = divmod(int(grid.tile[k]) - 1, cols)
            red = canvas_red[y1 + r * tile: y2 + r * tile, x1 + c * tile: x2 + c * tile]
        else:
            red = reds[grid.tile[k]][y1:y2, x1:x2]
        assert red.size > 0, f"token {k} has an empty patch"
        fractions[k] = red.mean()
        if red.mean() > 0.5:
            assert region[k], f"token {k} (tile {grid.tile[k]}) is red but outside the region"
        if not red.any():
            assert not region[k], f"token {k} (tile {grid.tile[k]}) has no red but is in the region"
    assert fractions.max() > 0 and region[int(fractions.argmax())], "the reddest token is outside the region"
    return region


def encode(loaded, rows):
    """Processor inputs for rows of images, with the tile count and first frame of each image where frames are flat."""
    adapter = loaded.adapter
    prompts = [adapter.prompt("what is in the image ?", n_images=len(r)) for r in rows]
    inputs = adapter.encode(prompts, rows)
    grids = adapter.row_grids(rows, inputs)
    tiles = [int(g.tile.max()) + 1 for per_row in grids for g in per_row]
    inputs["_tiles"] = tiles
    inputs["_first"] = np.concatenate([[0], np.cumsum(tiles)[:-1]]).astype(int).tolist()
    return inputs, grids


@pytest.mark.parametrize("family", TILED + SINGLE)
@pytest.mark.parametrize("size,box", SIZES, ids=[f"{s[0]}x{s[1]}" for s, _ in SIZES])
def test_a_painted_box_lights_exactly_its_tokens(folders, family, size, box):
    loaded = load(folders(family))
    image = painted(*size, box)
    inputs, grids = encode(loaded, [[image]])
    frames = frames_per_image(family, inputs, [[image]], loaded.processor)[0][0]
    region = check_grid(grids[0][0], frames, image, box, loaded.processor, anyres=family == "llava_onevision")
    mask = loaded.adapter.region_mask([[image]], inputs, [box])
    assert int(mask.sum()) == int(region.sum()) > 0


@pytest.mark.parametrize("family", TILED + SINGLE)
def test_several_images_per_prompt_and_rows_of_different_sizes(folders, family):
    loaded = load(folders(family))
    (s1, b1), (s2, b2), (s3, b3) = ((70, 30), (30, 0, 70, 30)), ((30, 90), (0, 40, 30, 90)), SIZES[3]
    rows = [[painted(*s1, b1), painted(*s2, b2)], [painted(*s3, b3)]]
    inputs, grids = encode(loaded, rows)
    frames = frames_per_image(family, inputs, rows, loaded.processor)
    anyres = family == "llava_onevision"
    for (image, box), grid, fr in zip([(rows[0][0], b1), (rows[0][1], b2)], grids[0], frames[0], strict=True):
        check_grid(grid, fr, image, box, loaded.processor, anyres)
    check_grid(grids[1][0], frames[1][0], rows[1][0], b3, loaded.processor, anyres)
    mask = loaded.adapter.region_mask(rows, inputs, [b1, b3])
    image_tokens = inputs["input_ids"] == loaded.adapter.image_token_id
    first = image_tokens.cumsum(dim=1) <= len(grids[0][0])
    assert bool((mask[0] & ~first[0]).sum() == 0), "only the first image of a row holds the region"
    assert int(mask[0].sum()) == int(grids[0][0].overlaps(b1).sum())
    assert int(mask[1].sum()) == int(grids[1][0].overlaps(b3).sum())


def test_internvl_with_up_to_nine_tiles(model_dirs):
    loaded = load(model_dirs("internvl"))
    image, box = painted(130, 60, SIZES[3][1]), SIZES[3][1]
    loaded.processor.image_processor.max_patches = 9
    inputs, grids = encode(loaded, [[image]])
    assert int(grids[0][0].tile.max()) + 1 > 3, "a wide image gets several tiles and a thumbnail"
    check_grid(grids[0][0], frames_per_image("internvl", inputs, [[image]], loaded.processor)[0][0], image, box,
               loaded.processor, anyres=False)


def test_onevision_anyres_max_downsamples_the_tiles(model_dirs):
    loaded = load(model_dirs("llava_onevision"))
    loaded.model.config.vision_aspect_ratio = loaded.processor.vision_aspect_ratio = "anyres_max_1"
    image, box = painted(70, 30, SIZES[0][1]), SIZES[0][1]
    inputs, grids = encode(loaded, [[image]])
    grid = grids[0][0]
    patch = loaded.model.config.vision_config.patch_size
    tiles = grid.pixels[grid.tile > 0]
    assert not np.allclose(tiles[:, 2] - tiles[:, 0], patch), "downsampled tokens cover more than one patch"
    check_grid(grid, frames_per_image("llava_onevision", inputs, [[image]], loaded.processor)[0][0], image, box,
               loaded.processor, anyres=True)


def test_idefics3_without_splitting_is_one_squashed_frame(model_dirs):
    loaded = load(model_dirs("idefics3"))
    loaded.processor.image_processor.do_image_splitting = False
    image, box = painted(70, 30, SIZES[0][1]), SIZES[0][1]
    inputs, grids = encode(loaded, [[image]])
    assert set(grids[0][0].tile.tolist()) == {0}
    check_grid(grids[0][0], frames_per_image("idefics3", inputs, [[image]], loaded.processor)[0][0], image, box,
               loaded.processor, anyres=False)


@pytest.mark.parametrize("family", TILED + SINGLE)
def test_tile_boxes_cover_the_original_image(folders, family):
    loaded = load(folders(family))
    image = Image.new("RGB", (70, 30))
    _, grids = encode(loaded, [[image]])
    boxes = grids[0][0].boxes[grids[0][0].tile >= 0]
    assert grids[0][0].overlaps((0, 0, 70, 30))[grids[0][0].tile >= 0].all(), "a token box lies off the image"
    covered = np.zeros((30, 70), dtype=bool)
    for x1, y1, x2, y2 in np.clip(boxes, 0, [70, 30, 70, 30]):
        covered[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = True
    assert covered.all(), "every original pixel belongs to some token"


def test_gemma3_pan_and_scan_is_refused_by_name(model_dirs):
    loaded = load(model_dirs("gemma3"))
    image = Image.new("RGB", (32, 32))
    inputs = loaded.adapter.encode([loaded.adapter.prompt("what ?")], [[image]])
    loaded.processor.images_kwargs = {**type(loaded.processor).images_kwargs, "do_pan_and_scan": True}
    with pytest.raises(GeometryError, match="pan-and-scan"):
        loaded.adapter.row_grids([[image]], inputs)


def test_a_run_whose_layout_cannot_be_mapped_says_so_once_in_its_summary(tmp_path, model_dirs, capsys):
    from vheads.cli.run import print_summary
    from vheads.models import Adapter, Loaded
    from vheads.pipeline.config import RunConfig
    from vheads.pipeline.run import run

    known = load(model_dirs("llava"))
    generic = Loaded(known.model, known.processor, Adapter(known.model, known.processor), known.name)
    summary = run(RunConfig(limit=4, batch_size=2, max_new_tokens=2, store=str(tmp_path / "s.duckdb"), name="r"),
                  loaded=generic)
    assert summary.notes == ["no region, pointing or spatial-entropy figures: vheads does not know how "
                             "LlavaForConditionalGeneration lays out image tokens"]
    capsys.readouterr()
    print_summary(summary)
    assert capsys.readouterr().out.count("no region, pointing") == 1


@pytest.mark.parametrize("family,adapter", [("internvl", "internvl"), ("llava_onevision", "llava_onevision"),
                                            ("smolvlm", "smolvlm"), ("idefics3", "idefics3"),
                                            ("paligemma", "paligemma"), ("mistral3", "mistral3"),
                                            ("llava_pixtral", "pixtral")])
def test_each_layout_has_its_adapter(folders, family, adapter):
    assert load(folders(family)).family == adapter


HUB_SIZES = [(640, 480), (1000, 3), (3, 700), (448, 448), (2950, 610), (777, 1999), (1201, 1200), (90, 2600)]


def test_token_counts_match_the_processors_at_hub_settings():
    """Pure geometry against the processors' own counts, with the sizes of the released checkpoints."""
    from tiny_models import word_tokenizer
    from transformers import (
        GotOcr2ImageProcessorPil,
        Idefics3ImageProcessorPil,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        PixtralImageProcessorPil,
    )

    from vheads.models.geometry import pixtral_grid
    from vheads.models.processors import image_only
    from vheads.models.tiles import idefics3_grid, internvl_grid, llava_next_grid

    internvl = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=12)
    pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    onevision = image_only(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=pins),
        tokenizer=word_tokenizer(("<image>", "<video>")), num_image_tokens=729, vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full")
    idefics = Idefics3ImageProcessorPil(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364})
    pixtral = PixtralImageProcessorPil(size={"longest_edge": 1540}, patch_size=28)
    for w, h in HUB_SIZES:
        assert len(internvl_grid(w, h, 448, 448, 256, True, 1, 12)) == 256 * internvl.get_number_of_image_patches(h, w)
        grid = llava_next_grid(w, h, onevision.image_processor, pins, 384, 14, cls_token=False, newline=True,
                               max_tiles=9)
        assert len(grid) == onevision._get_number_of_features(h, w, 384, 384), (w, h)
        split = idefics(images=[[Image.new("RGB", (w, h))]], return_row_col_info=True)
        rows, cols = split["rows"][0][0], split["cols"][0][0]
        assert len(idefics3_grid(w, h, idefics.size, True, 364, True, 169)) == 169 * (rows * cols + 1 if rows else 1)
        resized = pixtral(images=[[Image.new("RGB", (w, h))]], patch_size=28)["image_sizes"][0]
        assert len(pixtral_grid(w, h, *resized, 28)) == (resized[0] // 28) * (resized[1] // 28)
