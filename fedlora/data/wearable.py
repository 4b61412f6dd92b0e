"""The synthetic wearable source: per-client health-tracker records and their advice.

A client's id picks a user profile (athlete, type-2 diabetic, ...) that shifts its
readings, so clients are non-IID; the answer is a deterministic, templated function of
the readings (:func:`wearable_advice`), so a small model can learn it within a few dozen
LoRA steps. Randomness comes from :class:`random.Random` seeded with strings, so every
process draws the same records.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fedlora.seeds import data_rng


@dataclass(frozen=True)
class Profile:
    """A kind of wearable user: reading distributions and how they phrase questions.

    Each ``(mean, sd)`` pair parameterises a normal draw; ``pregnant`` switches the
    advice to pregnancy glucose targets and the gestational-hypertension threshold
    (and every question of this profile says so, so the switch is learnable).
    """

    name: str
    intros: tuple[str, ...]
    hr: tuple[float, float]
    fasting_share: float
    fasting: tuple[float, float]
    post_meal: tuple[float, float]
    sys: tuple[float, float]
    dia: tuple[float, float]
    sleep: tuple[float, float]
    steps_share: float
    steps: tuple[float, float]
    pregnant: bool = False


PROFILES: tuple[Profile, ...] = (
    Profile("endurance athlete", ("I'm training for a marathon.", "Endurance athlete here."),
            hr=(49, 5), fasting_share=0.7, fasting=(86, 8), post_meal=(118, 15),
            sys=(114, 8), dia=(71, 6), sleep=(8.0, 0.7), steps_share=0.9, steps=(16000, 4000)),
    Profile("type-2 diabetic", ("I have type 2 diabetes.", "Type 2 diabetic here."),
            hr=(78, 8), fasting_share=0.5, fasting=(150, 30), post_meal=(215, 40),
            sys=(132, 10), dia=(83, 7), sleep=(6.8, 0.8), steps_share=0.6, steps=(5000, 2000)),
    Profile("hypertensive office worker", ("I work long hours at a desk and have high blood pressure.",
                                           "Office worker with hypertension."),
            hr=(77, 8), fasting_share=0.6, fasting=(98, 10), post_meal=(135, 20),
            sys=(147, 12), dia=(94, 8), sleep=(6.5, 0.7), steps_share=0.7, steps=(4000, 1500)),
    Profile("night-shift worker", ("I work night shifts.", "Night-shift nurse here."),
            hr=(74, 7), fasting_share=0.5, fasting=(100, 10), post_meal=(145, 20),
            sys=(125, 10), dia=(80, 7), sleep=(5.2, 0.9), steps_share=0.6, steps=(7000, 2500)),
    Profile("healthy senior", ("I'm 72 and in good health.", "Retiree here, 70 years old."),
            hr=(66, 6), fasting_share=0.7, fasting=(95, 8), post_meal=(134, 18),
            sys=(133, 10), dia=(77, 7), sleep=(6.9, 0.8), steps_share=0.8, steps=(6000, 2000)),
    Profile("pregnant", ("I'm 26 weeks pregnant.", "Pregnant, second trimester."),
            hr=(84, 7), fasting_share=0.5, fasting=(91, 9), post_meal=(124, 18),
            sys=(117, 11), dia=(73, 8), sleep=(7.3, 1.0), steps_share=0.7, steps=(6000, 2000),
            pregnant=True),
    Profile("sedentary student", ("I'm a student and mostly sit at my laptop.", "Student here, not very active."),
            hr=(81, 8), fasting_share=0.6, fasting=(89, 8), post_meal=(124, 15),
            sys=(117, 8), dia=(73, 6), sleep=(6.1, 1.2), steps_share=0.9, steps=(3000, 1200)),
    Profile("prediabetic", ("My doctor says I'm prediabetic.", "I was told I have prediabetes."),
            hr=(74, 7), fasting_share=0.6, fasting=(113, 9), post_meal=(165, 20),
            sys=(128, 9), dia=(82, 6), sleep=(6.9, 0.8), steps_share=0.7, steps=(5500, 2000)),
)

_LEADS = ("My watch today:", "Today's readings from my wearable:", "My tracker says:")
_ASKS = ("Any advice?", "What should I do?", "How am I doing?", "Is this okay?")


def profile_for(partition_id: int) -> Profile:
    """The user profile of client ``partition_id`` (a fixed cycle through PROFILES)."""
    return PROFILES[partition_id % len(PROFILES)]


def wearable_records(seed: int, partition_id: int, n: int) -> list[dict]:
    """``n`` readings of client ``partition_id``, drawn from its profile.

    Each record is ``{"profile", "pregnant", "hr", "glucose", "glucose_kind"
    ("fasting" | "post-meal"), "sys", "dia", "sleep", "steps" (int or None),
    "question"}``; identical in every process for the same arguments.
    """
    profile = profile_for(partition_id)
    rng = data_rng("wearable", seed, partition_id)

    def draw(spec: tuple[float, float], lo: float, hi: float) -> float:
        return min(hi, max(lo, rng.gauss(*spec)))

    records = []
    for _ in range(n):
        fasting = rng.random() < profile.fasting_share
        sys_bp = round(draw(profile.sys, 85, 200))
        # Diastolic below systolic by a physiological margin whatever the draws.
        dia_bp = min(round(draw(profile.dia, 50, 125)), sys_bp - 20)
        rec = {
            "profile": profile.name,
            "pregnant": profile.pregnant,
            "hr": round(draw(profile.hr, 38, 130)),
            "glucose": round(draw(profile.fasting if fasting else profile.post_meal, 55, 340)),
            "glucose_kind": "fasting" if fasting else "post-meal",
            "sys": sys_bp,
            "dia": dia_bp,
            "sleep": round(draw(profile.sleep, 2.5, 11.5), 1),
            "steps": round(draw(profile.steps, 300, 35000)) if rng.random() < profile.steps_share else None,
        }
        rec["question"] = _question(rec, rng.choice(profile.intros), rng.choice(_LEADS), rng.choice(_ASKS))
        records.append(rec)
    return records


def record_example(record: dict) -> dict:
    """The chat example of one wearable record (question -> :func:`wearable_advice`)."""
    return {
        "messages": [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": wearable_advice(record)},
        ]
    }


def wearable_advice(r: dict) -> str:
    """Templated advice for one set of readings: a pure function of them.

    Uses the keys ``hr, glucose, glucose_kind, sys, dia, sleep, steps, pregnant`` of a
    :func:`wearable_records` record. Readings in range are named in one sentence; each
    out-of-range reading gets a short sentence restating the number, the threshold it
    crossed and one concrete step. Synthetic training data, not medical advice.
    """
    in_range: list[str] = []
    flags: list[str] = []
    for reading, key, flag_of in _ADVICE_RULES:
        if r[key] is None:  # not measured: ``steps`` when the tracker does not count them
            continue
        flag = flag_of(r)
        if flag is None:
            in_range.append(reading)
        else:
            flags.append(flag)
    sentences = [_in_range_sentence(in_range, r)] if in_range else []
    sentences.extend(flags)
    if not flags:
        sentences.append("Keep up your routine.")
    return " ".join(sentences)


def _heart_rate_flag(r: dict) -> str | None:
    hr = r["hr"]
    if hr < 50:
        return f"Resting HR {hr} bpm is under 50; fine if you train, else see a doctor."
    if hr > 100:
        return f"Resting HR {hr} bpm is over 100; rest, skip caffeine and see a doctor if it lasts."
    return None


def _glucose_flag(r: dict) -> str | None:
    g, kind = r["glucose"], r["glucose_kind"]
    glucose = f"{kind.capitalize()} glucose {g} mg/dL"
    if g < 70:
        return f"{glucose} is under 70 (low); eat 15 g of sugar and recheck."
    if g >= 250:
        return f"{glucose} is very high; check ketones and call your doctor today."
    if r.get("pregnant"):
        # Pregnancy targets replace the diabetes and prediabetes thresholds.
        target = 95 if kind == "fasting" else 120
        return f"{glucose} is above the {target} pregnancy target; tell your midwife." if g >= target else None
    if kind == "fasting" and g >= 126:
        return f"{glucose} is above the 126 diabetes threshold; ask your doctor about HbA1c."
    if kind == "fasting" and g >= 100:
        return f"{glucose} is in the 100-125 prediabetes range; cut sugary drinks."
    if kind == "post-meal" and g >= 200:
        return f"{glucose} is 200 or more; see your doctor soon."
    if kind == "post-meal" and g >= 140:
        return f"{glucose} is above the 140 target; eat smaller, lower-carb meals."
    return None


def _blood_pressure_flag(r: dict) -> str | None:
    s, d = r["sys"], r["dia"]
    bp = f"BP {s}/{d} mmHg"
    if s >= 180 or d >= 120:
        return f"{bp} is a hypertensive crisis; seek urgent care now."
    if r.get("pregnant") and (s >= 140 or d >= 90):
        return f"{bp} is at the 140/90 pregnancy hypertension threshold; call your maternity team today."
    if s >= 140 or d >= 90:
        return f"{bp} is stage 2 hypertension (140/90+); cut salt and see your doctor."
    if s >= 130 or d >= 80:
        return f"{bp} is stage 1 hypertension (130/80+); cut salt and alcohol."
    if s >= 120:
        return f"{bp} is elevated (systolic 120+); move more and eat less salt."
    if s < 90 or d < 60:
        return f"{bp} is low (under 90/60); drink fluids and stand up slowly."
    return None


def _sleep_flag(r: dict) -> str | None:
    sleep = r["sleep"]
    if sleep < 6:
        return f"Sleep {sleep} h is well under 7 h; keep a fixed bedtime."
    if sleep < 7:
        return f"Sleep {sleep} h is a bit under 7 h; go to bed 30 minutes earlier."
    if sleep > 9:
        return f"Sleep {sleep} h is over 9 h; tell your doctor if you still feel tired."
    return None


def _activity_flag(r: dict) -> str | None:
    steps = r["steps"]
    return f"{steps} steps is under 5000; add a 20-minute walk." if steps < 5000 else None


# (reading named when in range, record key it needs, its flag rule), in the answer's order.
_ADVICE_RULES: tuple[tuple[str, str, Callable[[dict], str | None]], ...] = (
    ("heart rate", "hr", _heart_rate_flag),
    ("glucose", "glucose", _glucose_flag),
    ("blood pressure", "sys", _blood_pressure_flag),
    ("sleep", "sleep", _sleep_flag),
    ("activity", "steps", _activity_flag),
)


def _in_range_sentence(in_range: list[str], r: dict) -> str:
    """One sentence naming every in-range reading."""
    listed = in_range[0] if len(in_range) == 1 else ", ".join(in_range[:-1]) + " and " + in_range[-1]
    verb = "is" if len(in_range) == 1 else "are"
    # Two phrasings picked by the readings themselves, so the answer stays a function
    # of them while the wording is not entirely fixed.
    if (r["hr"] + r["glucose"] + r["sys"]) % 2:
        return f"Your {listed} {verb} in a healthy range."
    return f"Good news: your {listed} {verb} fine."


def _question(r: dict, intro: str, lead: str, ask: str) -> str:
    readings = [
        f"resting HR {r['hr']} bpm",
        f"{r['glucose_kind']} glucose {r['glucose']} mg/dL",
        f"BP {r['sys']}/{r['dia']} mmHg",
        f"slept {r['sleep']} h",
    ]
    if r["steps"] is not None:
        readings.append(f"{r['steps']} steps")
    return f"{intro} {lead} {', '.join(readings)}. {ask}"


# How each reading's flag sentence starts (the rules above), to read an answer back field by field.
_FLAG_STARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("heart rate", re.compile(r"Resting HR \d")),
    ("glucose", re.compile(r"(Fasting|Post-meal) glucose \d")),
    ("blood pressure", re.compile(r"BP \d")),
    ("sleep", re.compile(r"Sleep \d")),
    ("activity", re.compile(r"\d+ steps is")),
)
_IN_RANGE = re.compile(r"^(?:Your|Good news: your) (.+?) (?:is|are) (?:in a healthy range|fine)\.?$")
IN_RANGE = "in range"


def advice_fields(text: str) -> dict[str, str]:
    """What an advice text says of each reading: ``"in range"`` (named in the in-range sentence) or the
    reading's flag sentence (its number, threshold and step, exactly), keyed by the reading's name
    (heart rate, glucose, blood pressure, sleep, activity). A reading the text does not mention is
    absent; one said twice (or both in range and flagged) reads as ``"contradictory"``. Reading
    :func:`wearable_advice`'s own text gives back the rules' verdicts, so a generated answer is
    scored against the rule that produced its reference field by field."""
    fields: dict[str, str] = {}

    def say(name: str, verdict: str) -> None:
        fields[name] = "contradictory" if name in fields else verdict

    for sentence in re.split(r"(?<=\.)\s+(?=[A-Z0-9])", " ".join(text.split())):
        named = _IN_RANGE.match(sentence)
        if named:
            for name in re.split(r", | and ", named.group(1)):
                say(name.strip(), IN_RANGE)
            continue
        for name, start in _FLAG_STARTS:
            if start.match(sentence):
                say(name, sentence)
                break
    return fields
