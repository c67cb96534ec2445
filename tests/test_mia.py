"""MIA-DPO augmentation (hallu.data.mia, `hallu prepare mia`): layouts and labels checked on real pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hallu.commands import app
from hallu.data import mia
from hallu.records import Prompt, read_records, write_records

runner = CliRunner()
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def _solid(colour, size) -> Image.Image:
    return Image.new("RGB", size, colour)


def _dark(arr: np.ndarray) -> np.ndarray:
    return (arr < 100).all(axis=-1)


def test_grid_geometry_matches_the_released_layout():
    # 2 images: one row, 40 px between cells, the row 40 px down for its labels.
    size, cells, labels = mia.grid_geometry(2)
    assert size == (448 * 2 + 40, 448 + 40) and cells == [(0, 40), (488, 40)] and labels == [(20, 0), (508, 0)]
    size, cells, _ = mia.grid_geometry(4)
    assert size == (936, 976) and cells == [(0, 40), (488, 40), (0, 528), (488, 528)]
    size, cells, _ = mia.grid_geometry(6)
    assert size == (448 * 3 + 80, 2 * 488) and cells[3] == (0, 528) and cells[5] == (976, 528)
    size, cells, _ = mia.grid_geometry(9)
    assert size == (1424, 1464) and cells[8] == (976, 1016)
    with pytest.raises(Exception, match="5 images"):
        mia.grid_geometry(5)


def test_grid_cells_and_labels_on_pixels():
    # A wide, a tall and a square image: each fits its cell with aspect kept, at the cell's top-left.
    images = [_solid(RED, (200, 100)), _solid(GREEN, (50, 100)), _solid(BLUE, (30, 30)), _solid(YELLOW, (10, 10))]
    canvas, cells = mia.compose_grid(images)
    arr = np.asarray(canvas)
    assert canvas.size == (936, 976)
    (x0, y0, _, _), (x1, y1, _, _), (x2, y2, _, _), (x3, y3, _, _) = cells
    assert tuple(arr[y0 + 100, x0 + 440]) == RED and tuple(arr[y0 + 223, x0 + 5]) == RED  # 448 x 224
    assert tuple(arr[y0 + 230, x0 + 100]) == (255, 255, 255)  # below the wide image: the white cell
    assert tuple(arr[y1 + 440, x1 + 220]) == GREEN and tuple(arr[y1 + 100, x1 + 230]) == (255, 255, 255)  # 224 x 448
    assert tuple(arr[y2 + 447, x2 + 447]) == BLUE and tuple(arr[y3 + 1, x3 + 1]) == YELLOW
    assert (arr[:, 448:488] == 255).all()  # the 40 px gutter between columns is white
    for k, (x, y, _, _) in enumerate(cells, 1):
        band = _dark(arr[y - 40:y, x:x + 448])
        cols = np.nonzero(band.any(axis=0))[0]
        assert band.sum() > 100, f"label Image{k} missing"
        assert 18 <= cols.min() <= 24 and cols.max() < 200  # starts 20 px right of the corner
    # The labels differ: Image1 and Image2 are not the same pixels.
    l1 = _dark(arr[0:40, 0:200])
    l2 = _dark(arr[0:40, 488:688])
    assert (l1 != l2).any()
    # Nothing dark anywhere but in label bands (all images here are bright).
    label_rows = np.zeros(arr.shape[0], bool)
    for _, y, _, _ in cells:
        label_rows[y - 40:y + 4] = True
    assert not _dark(arr[~label_rows]).any()


def test_pip_is_70_percent_and_centred():
    canvas, box = mia.compose_pip(_solid(RED, (200, 100)), _solid(BLUE, (400, 300)))
    assert box == [60, 80, 280, 140]  # width binds: 0.7 * 400 = 280, height 140 < 0.7 * 300
    arr = np.asarray(canvas)
    assert tuple(arr[80, 60]) == RED and tuple(arr[219, 339]) == RED
    assert tuple(arr[79, 60]) == BLUE and tuple(arr[80, 59]) == BLUE and tuple(arr[220, 339]) == BLUE
    _, box = mia.compose_pip(_solid(RED, (100, 200)), _solid(BLUE, (400, 300)))
    assert box == [147, 45, 105, 210]  # height binds: 0.7 * 300 = 210, width 105, x = (400 - 105) // 2


def test_noise_only_inside_the_box_and_seeded():
    im = _solid((128, 128, 128), (100, 80))
    noisy = np.asarray(mia.add_noise(im, 225.0, seed=3, box=[10, 20, 30, 40])).astype(int)
    orig = np.asarray(im).astype(int)
    inside = np.zeros(orig.shape[:2], bool)
    inside[20:60, 10:40] = True
    assert (noisy[~inside] == orig[~inside]).all()
    assert (noisy[inside] != 128).mean() > 0.9
    assert noisy.min() == 0 and noisy.max() == 255  # clipped, not wrapped
    again = np.asarray(mia.add_noise(im, 225.0, seed=3, box=[10, 20, 30, 40])).astype(int)
    assert (again == noisy).all()
    whole = np.asarray(mia.add_noise(im, 49.0, seed=1)).astype(int)
    assert 40 < whole.std() < 55


def test_questions():
    assert mia.sequence_question("<image>\nWhat is on the table?", 3, 2) == (
        "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, what is on the table?")
    assert mia.lower_first("TV or radio?") == "TV or radio?"
    turns = [{"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "A box."},
             {"role": "user", "text": "Which colour?"}, {"role": "assistant", "text": "Red."}]
    assert [t["text"] for t in mia.sequence_turns(turns, "Q1", 2)] == ["Q1", "A box.", "In image2, which colour?",
                                                                       "Red."]
    assert mia.refusal_answer(3) == "You only provided 3 images, Image4 does not exist."
    p = Prompt(id="x", images=["a"], question="Where is the box [0.1, 0.2, 0.5, 0.6]?")
    assert mia.has_box_coordinates(p)
    assert not mia.has_box_coordinates(Prompt(id="y", images=["a"], question="Is [this] a box?"))


# --------------------------------------------------------------------------------------------------
# The command


COLOURS = {"coco": [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)], "gqa": [(0, 250, 250), (250, 0, 250)]}


@pytest.fixture
def single_prompts(tmp_path) -> Path:
    root = tmp_path / "src"
    prompts = []
    for bucket, colours in COLOURS.items():
        for i, c in enumerate(colours):
            rel = f"{bucket}/img{i}.png"
            (root / bucket).mkdir(parents=True, exist_ok=True)
            _solid(c, (64, 48)).save(root / rel)
            prompts.append(Prompt(id=f"{bucket}-{i}", images=[rel], question="What colour is the picture?",
                                  reference=f"colour {c}", meta={"colour": list(c)}))
    prompts.append(Prompt(id="boxed", images=["coco/img0.png"], question="What is at [0.1, 0.2, 0.3, 0.4]?"))
    write_records(root / "prompts.jsonl", prompts)
    return root / "prompts.jsonl"


def _colour_of(path: Path) -> tuple:
    return tuple(np.asarray(Image.open(path).convert("RGB"))[5, 5])


def test_prepare_mia_builds_all_layouts(tmp_path, single_prompts):
    out = tmp_path / "run"
    res = runner.invoke(app, ["prepare", "mia", "--prompts", str(single_prompts), "--out", str(out),
                              "--formats", "sequence,grid,pip", "--refusal-every", "1", "--seed", "5"])
    assert res.exit_code == 0, res.output
    recs = read_records(out / "data" / "prompts.jsonl", Prompt)
    by_id = {r.id: r for r in recs}
    base = single_prompts.parent
    colour_bucket = {tuple(c): b for b, cs in COLOURS.items() for c in cs}
    for src in [p for p in read_records(single_prompts, Prompt) if p.id != "boxed"]:
        bucket = src.id.split("-")[0]
        target = str((base / src.images[0]).resolve())

        seq = by_id[f"{src.id}.seq"]
        m = seq.meta["mia"]
        n, k = m["n_images"], m["target"]
        assert 2 <= n <= min(5, len(COLOURS[bucket])) and len(seq.images) == n == len(set(seq.images))
        assert seq.images[k - 1] == target
        assert all(colour_bucket[_colour_of(Path(i))] == bucket for i in seq.images)  # companions: same bucket
        lines = seq.question.split("\n")
        assert lines[:n] == [f"Image{i}:<image>" for i in range(1, n + 1)]
        assert lines[n] == f"In Image{k}, what colour is the picture?" and seq.reference == src.reference
        ref = by_id[f"{src.id}.seq-refusal"]
        assert ref.images == seq.images and ref.question.endswith(f"In Image{n + 1}, what colour is the picture?")
        assert ref.reference == f"You only provided {n} images, Image{n + 1} does not exist."

        grid = by_id[f"{src.id}.grid"]
        gm = grid.meta["mia"]
        arr = np.asarray(Image.open(out / "data" / grid.images[0]).convert("RGB"))
        x, y, _, _ = gm["cells"][gm["target"] - 1]
        assert tuple(arr[y + 10, x + 10]) == tuple(src.meta["colour"])  # the asked-about cell shows the source
        assert grid.question == f"In Image{gm['target']}, what colour is the picture?"
        assert len(gm["cells"]) == gm["n_images"] in mia.GRID_SHAPES
        noisy = np.asarray(Image.open(out / "data" / gm["corrupted_image"]).convert("RGB"))
        changed = (noisy != arr).any(axis=-1)
        assert changed[y:y + 448, x:x + 448].mean() > 0.9
        changed[y:y + 448, x:x + 448] = False
        assert not changed.any()  # noise only on the target cell

        pip = by_id[f"{src.id}.pip"]
        pm = pip.meta["mia"]
        parr = np.asarray(Image.open(out / "data" / pip.images[0]).convert("RGB"))
        bx, by, bw, bh = pm["box"]
        assert (bx, by, bw, bh) == (10, 7, 44, 33)  # 70 % of 64 x 48, centred
        assert tuple(parr[24, 32]) == tuple(src.meta["colour"])
        assert tuple(parr[1, 1]) != tuple(src.meta["colour"]) and colour_bucket[tuple(parr[1, 1])] == bucket
        assert pm["background"] != target
        assert pip.question.split(", ", 1)[1] == "what colour is the picture?"
        assert pip.question.split(", ", 1)[0] in mia.CENTRE_PHRASES
    # The prompt with box coordinates is kept out of grid and pic-in-pic, not out of sequences.
    assert "boxed.seq" in by_id and "boxed.grid" not in by_id and "boxed.pip" not in by_id
    st = json.loads((out / "manifest.json").read_text())["stages"]["prepare"]
    assert st["status"] == "done" and st["outputs"]["prompts"]["count"] == len(recs)
    assert st["summary"]["filtered"] == {"box coordinates (grid)": 1, "box coordinates (pip)": 1}
    # Seeded: the same command gives the same records and pixels.
    out2 = tmp_path / "run2"
    assert runner.invoke(app, ["prepare", "mia", "--prompts", str(single_prompts), "--out", str(out2),
                               "--refusal-every", "1", "--seed", "5"]).exit_code == 0
    assert (out2 / "data" / "prompts.jsonl").read_bytes() == (out / "data" / "prompts.jsonl").read_bytes()


def test_prepare_mia_bad_formats_and_missing_images(tmp_path, single_prompts):
    res = runner.invoke(app, ["prepare", "mia", "--prompts", str(single_prompts), "--out", str(tmp_path / "r"),
                              "--formats", "sequence,collage"])
    assert res.exit_code == 2 and "--formats sequence,collage: unknown layout collage" in res.output
    # Writing into the run whose data holds the input would replace the images the prompts name.
    inside = tmp_path / "runx" / "data" / "prompts.jsonl"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(single_prompts.read_bytes())
    res = runner.invoke(app, ["prepare", "mia", "--prompts", str(inside), "--out", str(tmp_path / "runx")])
    assert res.exit_code == 2 and "lies inside --out" in res.output
    (single_prompts.parent / "gqa" / "img1.png").unlink()
    res = runner.invoke(app, ["prepare", "mia", "--prompts", str(single_prompts), "--out", str(tmp_path / "s"),
                              "--formats", "sequence", "--strict"])
    assert res.exit_code == 2 and "prompt gqa-1: image" in res.output and "not found" in res.output
    assert not (tmp_path / "s" / "data").exists()
    res = runner.invoke(app, ["prepare", "mia", "--prompts", str(single_prompts), "--out", str(tmp_path / "t"),
                              "--formats", "sequence", "--refusal-every", "0"])
    assert res.exit_code == 0, res.output
    recs = read_records(tmp_path / "t" / "data" / "prompts.jsonl", Prompt)
    # gqa has one image left: no companion for it, so no gqa sequence; no refusal variants asked for.
    assert sorted(r.id for r in recs) == ["boxed.seq", "coco-0.seq", "coco-1.seq", "coco-2.seq", "coco-3.seq"]


def test_sequence_of_a_multi_turn_prompt(tmp_path):
    for i, c in enumerate((RED, GREEN, BLUE)):
        _solid(c, (32, 32)).save(tmp_path / f"{i}.png")
    turns = [{"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "A square."},
             {"role": "user", "text": "Which colour is it?"}]
    prompts = [Prompt(id="t0", images=["0.png"], question="Which colour is it?", reference="Red.",
                      meta={"turns": turns, "bucket": "b"}),
               Prompt(id="t1", images=["1.png"], question="q", meta={"bucket": "b"}),
               Prompt(id="t2", images=["2.png"], question="q", meta={"bucket": "b"})]
    from hallu.data._importing import Tally

    out, _ = mia.augment(prompts, tmp_path, tmp_path / "data", ["sequence", "grid"], seed=1, refusal_every=0,
                         tally=Tally())
    seq = next(p for p in out if p.id == "t0.seq")
    n, k = seq.meta["mia"]["n_images"], seq.meta["mia"]["target"]
    first, answer, last = seq.meta["turns"]
    assert first["text"] == mia.sequence_question("What is it?", n, k) and first["text"].count("<image>") == n
    assert answer == turns[1] and last["text"] == f"In image{k}, which colour is it?" == seq.question
    grid = next(p for p in out if p.id == "t0.grid")
    assert "turns" not in grid.meta  # a collage asks the single question only
