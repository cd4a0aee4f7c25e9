"""ee4d validate on clean, faulty and damaged releases."""
from __future__ import annotations

import json
from pathlib import Path

import av
import pytest

from engine.cli import main
from engine.release import Release, ReleaseError
from engine.release.validate import validate


def _codes(report):
    return sorted((p.code, p.take_uid) for p in report.all_problems())


def test_default_release_has_no_problem(default_release):
    report = validate(str(default_release))
    assert report.all_problems() == []
    assert len(report.takes) == 10
    for take in report.takes.values():
        assert sorted(take["views"]) == ["aria01_214-1", "cam01", "cam02", "cam03", "cam04"]
        assert len({v["frames"] for v in take["views"].values()}) == 1
        assert {v["codec"] for v in take["views"].values()} == {"h264"}
        assert {v["fps"] for v in take["views"].values()} == {30.0}
    assert validate(str(default_release), resolution="448").all_problems() == []


def test_each_fault_reported_with_its_take_and_nothing_else(faults_release, tmp_path):
    report_path = tmp_path / "report.json"
    assert main(["validate", str(faults_release), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    takes = Release.open(str(faults_release)).takes()
    by_name = {t.take_name: t.take_uid for t in takes}
    found = {(p["code"], p.get("take_uid")): p for t in report["takes"].values() for p in t["problems"]}
    found.update({(p["code"], p.get("take_uid")): p for p in report["problems"]})
    assert len(found) == 4 == report["summary"]["problems"]
    first, second, third = (takes[i].take_uid for i in range(3))
    assert "cam02" in found[("view_unreadable", first)]["reason"]
    assert found[("view_missing", second)]["file"].endswith("cam03.mp4")
    assert "cam01 7 short" in found[("frame_drift", third)]["reason"]
    unknown = [k for k in found if k[0] == "unknown_take"]
    assert len(unknown) == 1 and unknown[0][1] not in by_name.values()
    assert found[unknown[0]]["file"] == "annotations/keystep_train.json"
    assert report["summary"]["takes_ok"] == 2


def _takes_json(root: Path) -> list:
    return json.loads((root / "takes.json").read_text())


def test_broken_videos_are_reported_not_fatal(damaged):
    takes = _takes_json(damaged)
    videos = [damaged / t["root_dir"] / "frame_aligned_videos" for t in takes]
    (videos[0] / "cam01.mp4").write_bytes(b"")
    (videos[1] / "cam02.mp4").write_text("this is not a video\n")
    # A file whose header (moov first) is complete but whose frames were cut off.
    src = videos[2] / "cam03.mp4"
    with av.open(str(src)) as inp, av.open(str(src) + ".fs.mp4", "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = Path(str(src) + ".fs.mp4").read_bytes()
    Path(str(src) + ".fs.mp4").unlink()
    src.write_bytes(data[: len(data) * 3 // 5])
    report = validate(str(damaged))
    problems = {(p.code, p.take_uid, p.file.rsplit("/", 1)[-1]) for p in report.all_problems()}
    assert ("view_unreadable", takes[0]["take_uid"], "cam01.mp4") in problems
    assert ("view_unreadable", takes[1]["take_uid"], "cam02.mp4") in problems
    assert ("view_unreadable", takes[2]["take_uid"], "cam03.mp4") in problems
    truncated = [p for p in report.all_problems() if p.file.endswith("cam03.mp4")][0]
    assert "truncated" in truncated.reason or "decode" in truncated.reason
    assert len(report.all_problems()) == 3


def test_malformed_json_names_file_and_position(damaged, capsys):
    path = damaged / "annotations" / "relations_train.json"
    path.write_text('{"annotations": {"x": [1, 2,,]}}')
    report = validate(str(damaged))
    [problem] = report.all_problems()
    assert problem.code == "malformed_json" and problem.file == "annotations/relations_train.json"
    assert "line 1 column" in problem.reason
    (damaged / "takes.json").write_text("[{")
    assert main(["validate", str(damaged)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes.json" in err[0] and "malformed JSON" in err[0]


def test_unsafe_take_names_are_rejected_not_followed(damaged, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    takes = _takes_json(damaged)
    evil = json.loads(json.dumps(takes[0]))
    evil.update(take_uid="evil-1", take_name="../outside", root_dir="../outside")
    slashed = json.loads(json.dumps(takes[0]))
    slashed.update(take_uid="evil-2", take_name="a/b", root_dir="takes/a/b")
    (damaged / "takes.json").write_text(json.dumps(takes + [evil, slashed]))
    release = Release.open(str(damaged))
    opened = []
    real_open = release.fs.open
    monkeypatch.setattr(release.fs, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    assert {t.take_uid for t in release.takes()} == {t["take_uid"] for t in takes}
    assert {p.code for p in release.problems} == {"unsafe_path"}
    assert {p.entry for p in release.problems} == {"evil-1", "evil-2"}
    assert not any("outside" in p for p in opened)
    report = validate(str(damaged))
    assert sorted((p.code, p.entry) for p in report.all_problems()) == [("unsafe_path", "evil-1"),
                                                                        ("unsafe_path", "evil-2")]
    assert not outside.exists()


def test_missing_and_unknown_optional_fields_are_fine(damaged):
    takes = _takes_json(damaged)
    for t in takes:
        for key in ("best_exo", "task_end_sec", "capture", "is_narrated", "duration_sec"):
            t.pop(key, None)
        t["some_future_field"] = {"nested": [1, 2]}
    (damaged / "takes.json").write_text(json.dumps({t["take_uid"]: t for t in takes}))   # dict form
    report = validate(str(damaged))
    assert report.all_problems() == []
    assert all(len(t["views"]) == 5 for t in report.takes.values())


def test_malformed_entries_name_file_and_entry(damaged):
    path = damaged / "annotations" / "proficiency_demonstrator_train.json"
    data = json.loads(path.read_text())
    uid = data["annotations"][0]["take_uid"]
    del data["annotations"][0]["proficiency_score"]
    data["annotations"].append("not an object")
    path.write_text(json.dumps(data))
    report = validate(str(damaged))
    problems = report.all_problems()
    assert {(p.code, p.file, p.entry) for p in problems} == {
        ("malformed_entry", "annotations/proficiency_demonstrator_train.json", "0"),
        ("malformed_entry", "annotations/proficiency_demonstrator_train.json", str(len(data["annotations"]) - 1)),
    }
    assert [p for p in problems if p.entry == "0"][0].take_uid == uid
    assert "proficiency_score" in [p for p in problems if p.entry == "0"][0].reason


def test_splits_consistency(damaged):
    path = damaged / "annotations" / "splits.json"
    splits = json.loads(path.read_text())
    uid = splits["split_to_take_uids"]["train"][0]
    splits["split_to_take_uids"]["val"].append(uid)
    splits["split_to_take_uids"]["test"].append("no-such-take")
    path.write_text(json.dumps(splits))
    codes = _codes(validate(str(damaged)))
    assert ("split_conflict", uid) in codes and ("unknown_take", "no-such-take") in codes


def test_unreachable_release_fails_with_one_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nothing-here")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ReleaseError):
        Release.open(str(tmp_path))
