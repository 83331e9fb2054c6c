import shutil

import pytest

from convert import data


def _copy(src, dst, per_class=None):
    for cls in sorted(p.name for p in src.iterdir()):
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / cls / f.name)
    return dst


def test_scan_counts_classes_and_hashes(smear_dir):
    scan = data.scan(smear_dir)
    assert scan.classes == ["Benign", "Early", "Pre", "Pro"]
    assert len(scan.samples) == 32
    assert len({s.sha256 for s in scan.samples}) == 32
    assert all(s.number > 0 for s in scan.samples)


def test_scan_drops_duplicates_and_lists_corrupt_files(smear_dir, tmp_path):
    root = _copy(smear_dir, tmp_path / "d")
    first = sorted((root / "Pro").iterdir())[0]
    shutil.copy(first, root / "Pro" / "WBC-Malignant-Pro-999.jpg")  # byte duplicate
    (root / "Pre" / "broken.jpg").write_bytes(first.read_bytes()[:300])  # truncated JPEG
    (root / "Pre" / "notes.txt").write_text("not an image")
    scan = data.scan(root)
    assert len(scan.samples) == 32
    assert [d[0] for d in scan.duplicates] == ["Pro/WBC-Malignant-Pro-999.jpg"]
    skipped = dict(scan.skipped)
    assert "Pre/broken.jpg" in skipped and "Pre/notes.txt" in skipped


def test_missing_folder_and_empty_class_are_named(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.scan(tmp_path / "nope")
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "x.txt").write_text("x")
    with pytest.raises(data.DatasetError, match=r"class folder .*A has no usable image"):
        data.scan(tmp_path)


def test_split_is_deterministic_grouped_and_tests_on_the_newest_numbers(smear_dir):
    scan = data.scan(smear_dir)
    a = data.split(scan.samples, 0.25, 0.25, block=2, seed=0)
    b = data.split(list(reversed(scan.samples)), 0.25, 0.25, block=2, seed=0)
    assert data.split_hash(a) == data.split_hash(b)
    ids = {p: {s.sha256 for s in a[p]} for p in data.PARTS}
    assert ids["train"].isdisjoint(ids["test"]) and ids["train"].isdisjoint(ids["val"])
    assert ids["val"].isdisjoint(ids["test"]) and sum(map(len, ids.values())) == len(scan.samples)
    for cls in scan.classes:
        assert sum(s.label == cls for s in a["test"]) == 2 and sum(s.label == cls for s in a["val"]) == 2
        # the test split holds each class's newest acquisition numbers (new patients)
        rest = max(s.number for s in scan.samples if s.label == cls and s.sha256 not in ids["test"])
        assert min(s.number for s in a["test"] if s.label == cls) > rest
    # each block of 2 consecutive numbers sits wholly in one part
    for cls in scan.classes:
        items = sorted((s for s in scan.samples if s.label == cls), key=lambda s: s.number)
        for i in range(0, len(items), 2):
            parts = {next(p for p in data.PARTS if items[j].sha256 in ids[p]) for j in range(i, min(i + 2, len(items)))}
            assert len(parts) == 1
    assert data.split_hash(data.split(scan.samples, 0.25, 0.25, block=2, seed=1)) != data.split_hash(a)


def test_blocks_are_the_blocks_the_split_cut(smear_dir):
    scan = data.scan(smear_dir)
    parts = data.split(scan.samples, 0.25, 0.25, block=2, seed=0)
    block_of = data.blocks([s for p in data.PARTS for s in parts[p]], block=2)
    assert set(block_of) == {s.path for s in scan.samples}
    part_of = {s.path: p for p in data.PARTS for s in parts[p]}
    by_block: dict = {}
    for s in scan.samples:
        label, b, first, last = block_of[s.path]
        assert label == s.label and first <= s.number <= last
        by_block.setdefault((label, b), []).append(s)
    for members in by_block.values():
        assert len(members) <= 2 and len({part_of[s.path] for s in members}) == 1  # one block, one part
        numbers = sorted(s.number for s in members)
        assert block_of[members[0].path][2:] == (numbers[0], numbers[-1])
    for cls in scan.classes:  # counted from the oldest image: block 0 holds the two lowest numbers
        oldest = min((s for s in scan.samples if s.label == cls), key=lambda s: s.number)
        assert block_of[oldest.path][1] == 0
        newest = max((s for s in scan.samples if s.label == cls), key=lambda s: s.number)
        assert part_of[newest.path] == "test"


def test_split_blocks_reads_the_split_files_block_size(smear_dir, tmp_path):
    scan = data.scan(smear_dir)
    parts = data.split(scan.samples, 0.25, 0.25, block=2, seed=0)
    data.write_split(tmp_path / "split.json", scan, parts, block=2)
    block_of = data.split_blocks(tmp_path / "split.json")
    assert block_of == data.blocks([s for p in data.PARTS for s in parts[p]], block=2)
    assert block_of != data.blocks([s for p in data.PARTS for s in parts[p]])  # not the default block size
    names = [s.path for s in parts["val"]]
    groups = data.block_groups(block_of, names)
    assert list(groups) == [f"{block_of[n][0]}:{block_of[n][1]}" for n in names]
    assert len(set(groups)) == len({block_of[n][:2] for n in names})


def test_scale_bar_corner_is_covered_with_the_texture_above_it(smear_dir):
    import numpy as np

    from device.preprocess import load_image

    img = np.asarray(load_image(next((smear_dir / "Pro").iterdir())))
    out = data.mask_scale_bar(img)
    rows, cols = data.SCALE_BAR_BOX
    assert np.array_equal(out[rows.start, cols], img[rows.start - 1, cols])  # mirrored
    assert np.array_equal(out[:rows.start], img[:rows.start]) and not np.array_equal(out, img)


def test_split_file_round_trip(smear_dir, tmp_path):
    scan = data.scan(smear_dir)
    parts = data.split(scan.samples, 0.25, block=2)
    data.write_split(tmp_path / "split.json", scan, parts, block=2)
    classes, back, doc = data.read_split(tmp_path / "split.json")
    assert classes == scan.classes and back == parts and doc["hash"] == data.split_hash(parts)


@pytest.mark.data
def test_real_set_has_the_documented_shape(real_data):
    scan = data.scan(real_data)
    assert scan.classes == ["Benign", "Early", "Pre", "Pro"]
    assert len(scan.duplicates) == 40 and all(d[0].startswith("Pro/") for d in scan.duplicates)
    assert len(scan.samples) == 2767 - 40
    parts = data.split(scan.samples)
    assert abs(len(parts["test"]) / len(scan.samples) - 0.2) < 0.02
    assert abs(len(parts["val"]) / len(scan.samples) - 0.15) < 0.02
