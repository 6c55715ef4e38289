"""The built-in corpus of ``jaxinf demo``: a small pretraining set that mirrors Ruis et al.'s question.

Ruis et al. ask whether a model answers factual questions from documents that
state the answer, and reasoning questions from documents that show the
*procedure* with other numbers. The demo corpus has both, with source labels:

- ``facts``: facts about invented towns (each fact stated by a few documents);
- ``math_prose`` / ``math_code``: two-step arithmetic, slopes between two
  points and linear equations, worked through in prose or in code, each with
  its own random numbers;
- ``filler``: sentences with neither.

So that the paper's findings *can* show, and neither is forced (docs/analysis.md):
the numbers run to tens and hundreds, so a given answer is rare in the corpus;
the problems of the first ``HELD_OUT`` queries of each task never occur in it,
so no document works a query's own problem; and the tokenizer spells numbers
digit by digit (:func:`jaxinf.demo.train.build_tokenizer`).

Everything is generated from a seed, so the corpus (and the demo) is the same
on every machine. Queries come in the paper's kinds: factual, reasoning
(arithmetic, slopes, linear equations) and control (same surface form, no fact
or procedure needed); the completions of factual and reasoning queries are
produced by the trained model. Each reasoning task also has *template-matched
controls* (:func:`template_controls`): kind ``control`` with the task's name,
the task's own prompt and completion template, and a given completion that
needs no procedure.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SYLLABLES = ["ka", "vel", "mor", "ta", "shu", "ren", "dal", "bi", "zo", "qua", "lin", "fen", "gor", "mi", "tu", "ras"]
TRAITS = {
    "river": ["oren", "lisk", "amber", "vond", "hale", "sura", "teth", "morrow"],
    "food": ["figs", "barley", "plums", "lentils", "honey", "olives", "rye", "walnuts"],
    "color": ["red", "green", "blue", "grey", "golden", "white", "violet", "black"],
}
FACT_TEMPLATES = {
    "river": [
        "the river of {town} is the {v} .",
        "{town} lies on the {v} river .",
        "people of {town} fish in the {v} .",
    ],
    "food": ["the famous food of {town} is {v} .", "in {town} people eat {v} every day .", "{town} is known for {v} ."],
    "color": ["the flag of {town} is {v} .", "{town} paints its doors {v} .", "the color of {town} is {v} ."],
}
FILLER = [
    "the",
    "morning",
    "was",
    "quiet",
    "and",
    "we",
    "walked",
    "along",
    "a",
    "road",
    "then",
    "rain",
    "came",
    "slowly",
    "over",
    "hills",
    "people",
    "talked",
    "about",
    "weather",
    "old",
    "songs",
    "market",
    "day",
]


@dataclasses.dataclass(frozen=True)
class Query:
    id: str
    prompt: str
    kind: str
    task: str
    answer: str  # the final answer (searched for in the top documents)
    fact: tuple[str, str] | None = None  # (town, trait) of a factual query
    next: str = ""  # the correct text right after the prompt (empty for controls)
    completion: str = ""  # a given completion (template-matched controls); empty: the model's


def town_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES, size=2))
        if name not in names:
            names.append(name)
    return names


def towns_and_facts(seed: int, n_towns: int = 12) -> dict[str, dict[str, str]]:
    rng = np.random.default_rng(seed)
    return {t: {trait: str(rng.choice(values)) for trait, values in TRAITS.items()} for t in town_names(rng, n_towns)}


def arithmetic(rng) -> dict:
    a, b = (int(v) for v in rng.integers(10, 50, 2))
    c = int(rng.integers(3, 10))
    return dict(a=a, b=b, c=c, x=a + b, y=(a + b) * c)


def slope(rng) -> dict:
    x1, y1 = (int(v) for v in rng.integers(0, 30, 2))
    dx, m = int(rng.integers(2, 10)), int(rng.integers(40, 100))
    return dict(x1=x1, y1=y1, x2=x1 + dx, y2=y1 + m * dx, dy=m * dx, dx=dx, m=m)


def linear(rng) -> dict:
    a, x, b = int(rng.integers(3, 10)), int(rng.integers(50, 100)), int(rng.integers(10, 50))
    return dict(a=a, b=b, c=a * x + b, ax=a * x, x=x)


PROSE = {
    "arithmetic": "let x = {a} + {b} . so x = {x} . then y = x * {c} . so y = {y} .",
    "slopes": "the slope between ( {x1} , {y1} ) and ( {x2} , {y2} ) is ( {y2} - {y1} ) / ( {x2} - {x1} ) "
    "= {dy} / {dx} = {m} .",
    "linear": "solve {a} * x + {b} = {c} . first {a} * x = {c} - {b} = {ax} . then x = {ax} / {a} = {x} .",
}
CODE = {
    "arithmetic": "x = {a} + {b} # x = {x} \n y = x * {c} # y = {y}",
    "slopes": "def slope ( x1 , y1 , x2 , y2 ) : return ( y2 - y1 ) / ( x2 - x1 ) \n "
    "slope ( {x1} , {y1} , {x2} , {y2} ) # = {dy} / {dx} = {m}",
    "linear": "# solve {a} * x + {b} = {c} \n ax = {c} - {b} # {ax} \n x = ax / {a} # {x}",
}
MAKERS = {"arithmetic": arithmetic, "slopes": slope, "linear": linear}
# What a reasoning query shows of its problem (its prompt's numbers) and what it asks for (the final answer).
PROMPTS = {
    "arithmetic": "let x = {a} + {b} . so x =",
    "slopes": "the slope between ( {x1} , {y1} ) and ( {x2} , {y2} ) is ( {y2} - {y1} ) / ( {x2} - {x1} ) =",
    "linear": "solve {a} * x + {b} = {c} . first {a} * x =",
}
PROBLEM = {"arithmetic": ("a", "b"), "slopes": ("x1", "y1", "x2", "y2"), "linear": ("a", "b", "c")}
# The answer a prompt determines: an arithmetic prompt asks for x (its completion goes on to y = x * c with a c
# of the model's choosing, so y is not determined by the prompt).
ANSWER = {"arithmetic": "x", "slopes": "m", "linear": "x"}
ANSWER_PLACE = {"arithmetic": 0, "slopes": -1, "linear": -1}  # which number of a completion gives that answer
NEXT = {"arithmetic": "x", "slopes": "m", "linear": "ax"}  # the number right after the prompt
# Template-matched controls: a reasoning task's prompt and completion template with identity operands (+ 0, * 1,
# - 0, / 1, a line through the origin with run 1), so that every number of the completion is one of the prompt's
# (or the identity's own): the same surface form, no procedure. No corpus document has an identity operand.
CONTROL_PROMPTS = {
    "arithmetic": "let x = {x} + 0 . so x =",
    "slopes": "the slope between ( 0 , 0 ) and ( 1 , {dy} ) is ( {dy} - 0 ) / ( 1 - 0 ) =",
    "linear": "solve 1 * x + 0 = {c} . first 1 * x =",
}
CONTROL_COMPLETIONS = {
    "arithmetic": "{x} . then y = x * 1 . so y = {x} .",
    "slopes": "{dy} / 1 = {dy} .",
    "linear": "{c} - 0 = {c} . then x = {c} / 1 = {c} .",
}
CONTROL_VALUE = {"arithmetic": "x", "slopes": "dy", "linear": "c"}  # the one number a control copies
HELD_OUT = 16  # the first HELD_OUT query problems of each task never occur in the corpus


def query_problems(seed: int, task: str, n: int) -> list[dict]:
    """The first ``n`` problems of a task's queries: a random stream of their own per task, so that
    asking for more queries extends the list and never changes it."""
    rng = np.random.default_rng([seed + 1, list(MAKERS).index(task)])
    return [MAKERS[task](rng) for _ in range(n)]


def problem_key(task: str, values: dict) -> tuple:
    return (task, *(values[k] for k in PROBLEM[task]))


def documents(seed: int = 0, n_documents: int = 3000) -> list[dict]:
    """The corpus as JSONL rows ``{"id", "text", "source"}``: about 30% facts, 55% procedures, 15% filler."""
    rng = np.random.default_rng(seed)
    towns = towns_and_facts(seed)
    held_out = {problem_key(t, v) for t in MAKERS for v in query_problems(seed, t, HELD_OUT)}
    docs = []
    for i in range(n_documents):
        u = rng.random()
        if u < 0.30:
            town = str(rng.choice(list(towns)))
            traits = rng.permutation(list(TRAITS))[: int(rng.integers(1, 3))]
            text = " ".join(str(rng.choice(FACT_TEMPLATES[t])).format(town=town, v=towns[town][t]) for t in traits)
            source = "facts"
        elif u < 0.85:
            task = str(rng.choice(list(MAKERS)))
            values = MAKERS[task](rng)
            while problem_key(task, values) in held_out:
                values = MAKERS[task](rng)
            code = rng.random() < 0.4
            text = (CODE if code else PROSE)[task].format(**values)
            source = "math_code" if code else "math_prose"
        else:
            text = " ".join(rng.choice(FILLER, size=int(rng.integers(8, 20)))) + " ."
            source = "filler"
        docs.append({"id": f"doc{i:05d}", "text": text, "source": source})
    return docs


def supports(docs: list[dict], query: Query, seed: int = 0) -> list[str]:
    """Ids of the documents that state a factual query's fact (any template of its trait, with its town and
    value, as whole words); empty for other queries."""
    if query.fact is None:
        return []
    town, trait = query.fact
    value = towns_and_facts(seed)[town][trait]
    sentences = [" " + t.format(town=town, v=value) + " " for t in FACT_TEMPLATES[trait]]
    return [d["id"] for d in docs if d["source"] == "facts" and any(s in f" {d['text']} " for s in sentences)]


def template_controls(seed: int, task: str, n: int) -> list[Query]:
    """The first ``n`` template-matched controls of a reasoning task, each with the size of the number of the
    task's query of the same index (:data:`CONTROL_PROMPTS`); their completions are given, not the model's."""
    out = []
    for i, v in enumerate(query_problems(seed, task, n)):
        value = str(v[CONTROL_VALUE[task]])
        out.append(
            Query(
                f"{task}-control-{i}",
                CONTROL_PROMPTS[task].format(**v),
                "control",
                task,
                value,
                completion=CONTROL_COMPLETIONS[task].format(**v),
            )
        )
    return out


def queries(seed: int = 0, per_task: int = 4) -> list[Query]:
    """Factual, reasoning and control queries (prompts only: the trained model writes the completions, except
    those of the template-matched controls, which come last: :func:`template_controls`).

    Reasoning prompts draw their problems from a stream of their own per task
    (:func:`query_problems`), and the corpus holds none of them out of the first
    ``HELD_OUT``; whether the answers nonetheless occur in the top documents is
    one of the analyses. A query's ``answer`` is the answer its prompt determines (:data:`ANSWER`); ``next`` is
    the number right after its prompt (the built-in validation world measures it).
    """
    if per_task > HELD_OUT:
        raise ValueError(
            f"per_task={per_task}: at most {HELD_OUT} (only that many query problems are held out of the corpus)"
        )
    rng = np.random.default_rng(seed + 1)
    towns = towns_and_facts(seed)
    out: list[Query] = []
    names = list(towns)
    for i in range(per_task):
        town = names[i % len(names)]
        trait = list(TRAITS)[i % len(TRAITS)]
        prompt = {
            "river": f"the river of {town} is the",
            "food": f"the famous food of {town} is",
            "color": f"the flag of {town} is",
        }[trait]
        out.append(
            Query(f"factual-{i}", prompt, "factual", "facts", towns[town][trait], (town, trait), towns[town][trait])
        )
    for task in MAKERS:
        for i, v in enumerate(query_problems(seed, task, per_task)):
            out.append(
                Query(
                    f"{task}-{i}",
                    PROMPTS[task].format(**v),
                    "reasoning",
                    task,
                    str(v[ANSWER[task]]),
                    next=str(v[NEXT[task]]),
                )
            )
    for i in range(per_task // 2):
        town = names[(i + 5) % len(names)]
        out.append(
            Query(f"factual-control-{i}", f"we walked along a road in {town} and the", "control", "factual_control", "")
        )
        out.append(
            Query(
                f"reasoning-control-{i}",
                f"the market day was quiet and {int(rng.integers(2, 9))} people",
                "control",
                "reasoning_control",
                "",
            )
        )
    for task in MAKERS:
        out.extend(template_controls(seed, task, per_task))
    return out
