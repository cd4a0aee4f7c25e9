"""The shard sample layout: typed, versioned, and refused clearly when a reader does not know it."""
from __future__ import annotations

import json

import pytest

from engine.shards import schema


def _meta(mode: str = "remux") -> schema.SampleMeta:
    media = ({"members": [schema.frame_member("ego", k) for k in range(2)]} if mode == "frames"
             else {"member": schema.video_member("ego")})
    return schema.SampleMeta(
        key=schema.sample_key("uid-1", 30),
        take=schema.TakeInfo(take_uid="uid-1", take_name="cooking_1", scenario="Cooking", task_name=None,
                             parent_task_id=10, split="train", best_exo="cam01", num_frames=120, fps=30.0),
        window=schema.Window(t0=1.0, t1=2.0, start_frame=30, end_frame=60),
        mode=mode,
        views={"ego": schema.ViewMeta(cam_id="aria01", stream_id="214-1", is_ego=True, key="aria01_214-1",
                                      source="takes/x/aria01_214-1.mp4", width=448, height=448,
                                      source_frames=[30, 45], media_start=1.0, media_end=1.5, **media)},
        sensors={"trajectory": schema.ArraySensor(schema.sensor_member("trajectory"), ["t_us", "x"], 10),
                 "audio": schema.AudioSensor(schema.AUDIO_MEMBER, codec="aac", rate=48000, channels=1, start=1.0,
                                             samples=48000)},
        annotations={"keystep_segments": []},
        arrays={"relations": {"member": "relations.npz", "arrays": {}}})


@pytest.mark.parametrize("mode", ["remux", "frames"])
def test_meta_round_trips_through_its_json(mode):
    meta = _meta(mode)
    data = json.loads(meta.encode())
    assert data["version"] == schema.VERSION
    assert ("members" in data["views"]["ego"]) == (mode == "frames") != ("member" in data["views"]["ego"])
    assert schema.read_meta(meta.encode()) == schema.SampleMeta.from_json(data) == meta
    assert data["key"] == "uid-1_00000030" and data["sensors"]["trajectory"]["member"] == "trajectory.npz"


def test_version_1_samples_are_refused_with_the_fix():
    data = _meta().to_json()
    for old in ({**data, "version": 1}, {k: v for k, v in data.items() if k != "version"}):   # no field: version 1
        with pytest.raises(schema.SchemaError, match=r"sample uid-1_00000030: layout version 1 .*write the shards again"):
            schema.SampleMeta.from_json(old)


def test_unknown_version_and_missing_or_unknown_fields_name_the_sample():
    data = _meta().to_json()
    with pytest.raises(schema.SchemaError, match=r"sample uid-1_00000030: layout version 3"):
        schema.SampleMeta.from_json({**data, "version": 3})
    broken = json.loads(json.dumps(data))
    del broken["views"]["ego"]["source_frames"]
    with pytest.raises(schema.SchemaError, match=r"sample uid-1_00000030: views\.ego lacks field source_frames"):
        schema.SampleMeta.from_json(broken)
    with pytest.raises(schema.SchemaError, match=r"sample uid-1_00000030: meta lacks field window"):
        schema.SampleMeta.from_json({k: v for k, v in data.items() if k != "window"})
    with pytest.raises(schema.SchemaError, match=r"take holds unknown field colour"):
        schema.SampleMeta.from_json({**data, "take": {**data["take"], "colour": "red"}})
