"""A fifth axis from outside the package: does the candidate cache change how long the model's
answers are?

Per prompt, the greedy continuation's length under the candidate is compared with the
reference's (both capped at --refract-n-predict); the score is 100 x (1 - |difference| /
longer length). Everything here uses the public axis and run API (pytest_refract.axes.base).

    pytest examples/custom_axis --refract-model=smollm2 --refract-candidate=ctk=q8_0,ctv=q4_0 \\
        --refract-axes=trajectory,length
"""

from pytest_refract.axes import Axis, Unit
from pytest_refract.scoring.metrics import band_for


class LengthAxis(Axis):
    NAME = "length"
    TITLE = "Answer length"
    NEEDS = ("prompts",)
    COMPARE_METRICS = (("  mean length gap (tokens)", "mean_gap_tokens", "{:.2f}", False),)

    def units(self, run):
        return [Unit(p.id, keywords=(p.category,), payload={"prompt": p.prompt}) for p in run.inputs.prompts]

    def planned_tokens(self, run, unit):
        return 2 * (len(run.inputs.chat_tokens(unit.payload["prompt"])) + run.settings.n_predict)

    def cache_reads(self, run):
        return {"n_predict": run.settings.n_predict}

    def measure(self, run, unit):
        tokens = run.inputs.chat_tokens(unit.payload["prompt"])
        n_predict = run.settings.n_predict
        ref = run.reference.greedy([tokens], n_predict)[0]
        cand = run.greedy(unit.candidate, [tokens], n_predict)[0]
        gap = abs(len(cand) - len(ref))
        score = 100.0 * (1.0 - gap / max(len(ref), len(cand)))
        return {"id": unit.id, "ref_len": len(ref), "cand_len": len(cand), "gap_tokens": gap,
                "score": score, "band": band_for(score)}

    def aggregate(self, results):
        section = super().aggregate(results)
        section["mean_gap_tokens"] = sum(r["gap_tokens"] for r in results) / len(results)
        return section

    def item_detail(self, item):
        return f"{item['cand_len']} tokens vs reference {item['ref_len']}"

    def diagnose(self, section, axes):
        if section.get("score") is not None and section["score"] < 80:
            return [f"Answer length moves: candidate answers differ by {section['mean_gap_tokens']:.1f} tokens "
                    "on average from the reference's."]
        return []


def pytest_refract_axes(config):
    return [LengthAxis()]
