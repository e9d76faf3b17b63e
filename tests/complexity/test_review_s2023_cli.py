"""Review (s2023) of ``medquant score`` (medquant/cli/complexity.py)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from medquant.cli import main


def test_a_bad_image_is_named_by_its_file_not_by_its_place_in_a_batch(tmp_path, capsys):
    """The scorer's message counted from the start of the batch of --batch-size images it was given: a 4x4 PNG at
    place 7 was reported as 'image 3', and a NaN in an .npz as 'input' (no image at all)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        img = np.full((4, 4), 3, np.uint8) if i == 7 else rng.integers(0, 256, (16, 16), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    rc = main(["score", str(folder), "--out", str(tmp_path / "a.csv"), "--no-progress", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "img07.png" in err and "4x4" in err, err

    imgs = rng.random((10, 16, 16))
    imgs[7, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", images=imgs)
    rc = main(["score", str(tmp_path / "nan.npz"), "--out", str(tmp_path / "b.csv"), "--no-progress",
               "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "nan.npz[7]" in err and "NaN" in err, err


def test_every_array_entry_gets_its_row_or_the_command_fails(tmp_path, capsys):
    """An .npz whose image array is one 2-D image (rows taken as 'images') or one (H, W, 3) RGB image: each batch
    of --batch-size entries was read by the scorer as one image, so the CSV had one row per batch under the first
    names while the command reported one image per entry ('scored 40 images', 3 rows written)."""
    rng = np.random.default_rng(1)
    for name, arr in (("flat.npz", rng.random((40, 24))), ("rgb.npz", rng.random((40, 24, 3)))):
        np.savez(tmp_path / name, images=arr)
        out = tmp_path / f"{name}.csv"
        rc = main(["score", str(tmp_path / name), "--out", str(out), "--no-progress", "--batch-size", "16"])
        captured = capsys.readouterr()
        rows = out.read_text().splitlines()[1:] if out.exists() else []
        # either every entry got its row, or the command refused the array
        assert (rc == 0 and len(rows) == len(arr)) or (rc == 2 and "(40, 24" in captured.err), (rc, len(rows),
                                                                                                 captured)


def test_save_state_creates_its_folder_as_out_and_plot_do(tmp_path, capsys):
    """--out and --plot create their parent folders; --save-state did not: the run wrote the CSV, then failed with
    'Parent directory ... does not exist' (no state, no plot)."""
    import csv

    import torch

    from medquant.complexity import ComplexityScorer

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (12, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=imgs)
    out, png, state = tmp_path / "a" / "m.csv", tmp_path / "b" / "h.png", tmp_path / "c" / "d" / "s.pt"
    rc = main(["score", str(tmp_path / "x.npz"), "--out", str(out), "--plot", str(png), "--save-state", str(state),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert png.exists()
    sc = ComplexityScorer()
    sc.load_state_dict(torch.load(state, weights_only=True))
    with open(out) as f:
        levels = [int(r["level"]) for r in csv.DictReader(f)]
    assert sc.levels(imgs).tolist() == levels


def test_a_state_saved_from_a_gpu_scorer_loads_with_the_default_cpu_device(tmp_path, capsys):
    """A state saved with torch.save(scorer.state_dict()) from a scorer on the GPU records its tensors as CUDA
    storages; --state loaded it without map_location, so on a machine without a GPU (and with --device cpu, the
    default) the command failed ('Attempting to deserialize object on a CUDA device')."""
    from unittest import mock

    import torch
    import torch.serialization

    from medquant.complexity import ComplexityScorer

    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (12, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=imgs)
    sc = ComplexityScorer(n_levels=3, edge_threshold=0.2).fit(imgs)
    state = tmp_path / "s.pt"
    # what torch.save writes for tensors on cuda:0 (their storages are tagged with the device they were on)
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(sc.state_dict(), state)
    out = tmp_path / "m.csv"
    with mock.patch.object(torch.cuda, "is_available", lambda: False):  # as on a machine without a GPU
        rc = main(["score", str(tmp_path / "x.npz"), "--out", str(out), "--state", str(state), "--no-progress",
                   "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    import csv

    with open(out) as f:
        levels = [int(r["level"]) for r in csv.DictReader(f)]
    assert levels == sc.levels(imgs).tolist()
