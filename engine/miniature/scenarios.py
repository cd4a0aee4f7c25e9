"""The eight Ego-Exo4D scenarios, plausible tasks and keysteps, used by the miniature release.

Scenario ids are the real parent_task_ids. Keystep benchmarks exist for the procedural
scenarios (cooking, health, bike repair); demonstration proficiency for the physical ones.
"""
from __future__ import annotations

import dataclasses

EGO_CAM = "aria01"              # the miniature's one Aria; real takes name theirs in takes.json


@dataclasses.dataclass(frozen=True)
class Scenario:
    parent_task_id: int
    name: str
    slug: str                       # as it appears in take names
    tasks: tuple[tuple[int, str], ...]
    keysteps: tuple[str, ...] = ()  # canonical order; empty for physical scenarios
    objects: tuple[str, ...] = ()
    procedural: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(1000, "Cooking", "cooking",
             ((1001, "Cooking an Omelet"), (1004, "Making Cucumber & Tomato Salad"), (1008, "Cooking Noodles")),
             ("Get ingredients", "Crack eggs into bowl", "Whisk eggs", "Heat pan", "Pour mixture into pan", "Plate the dish"),
             ("bowl", "pan", "cutting board", "knife"), procedural=True),
    Scenario(2000, "Health", "covidtest",
             ((2001, "Covid-19 Rapid Antigen Test"), (2005, "First Aid - CPR")),
             ("Open test kit", "Swab nostrils", "Insert swab into tube", "Read result"),
             ("test kit", "tube", "timer"), procedural=True),
    Scenario(4000, "Bike Repair", "bike",
             ((4001, "Remove a Wheel"), (4002, "Fix a Flat Tire - Replace a Bike Tube"), (4005, "Clean and Lubricate the Chain")),
             ("Release brake", "Open quick release", "Remove wheel", "Inflate tube", "Install wheel"),
             ("wheel", "pump", "wrench"), procedural=True),
    Scenario(5000, "Music", "music",
             ((5001, "Playing Guitar"), (5002, "Playing Violin"), (5003, "Playing Piano")),
             objects=("music stand", "chair", "instrument case")),
    Scenario(6000, "Basketball", "basketball",
             ((6001, "Basketball Drills - Mikan Layup"), (6002, "Basketball Drills - Reverse Layup"),
              (6003, "Basketball Drills - Mid-Range Jump Shooting")),
             objects=("cone", "ball rack", "water bottle")),
    Scenario(7000, "Rock Climbing", "rockclimbing",
             ((7001, "Rock Climbing"),), objects=("hold", "chalk bag", "rope")),
    Scenario(8000, "Soccer", "soccer",
             ((8001, "Soccer Drills - Inside Trap and Outside Play"), (8002, "Soccer Drills - Penalty Kick")),
             objects=("cone", "goal post", "ball")),
    Scenario(9000, "Dance", "dance",
             ((9001, "Dance - Basic Samba"), (9002, "Dance - Salsa Basic Step")),
             objects=("speaker", "mirror", "mat")),
)

UNIVERSITIES = ("cmu", "georgiatech", "iiith", "indiana", "minnesota", "nus", "sfu", "uniandes", "unc", "upenn", "utokyo", "fair")


def scenario_by_name(name: str) -> Scenario:
    for s in SCENARIOS:
        if name in (s.name, s.slug):
            return s
    raise KeyError(f"unknown scenario {name!r}; known: {', '.join(s.name for s in SCENARIOS)}")


def keystep_unique_id(scenario: Scenario, step_index: int) -> int:
    """Globally unique keystep id in the style of the real taxonomy (scenario id + step)."""
    return scenario.parent_task_id * 10 + 100000 + step_index + 1


def keystep_classes() -> list[tuple[int, int, str, str]]:
    """(label_id, step_unique_id, step_name, scenario_name) for every keystep of every procedural scenario."""
    rows = []
    for s in SCENARIOS:
        for i, step in enumerate(s.keysteps):
            rows.append((len(rows), keystep_unique_id(s, i), step, s.name))
    return rows
