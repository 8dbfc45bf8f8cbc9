"""An example custom reward (README, "Writing a custom reward function").

Use it from a recipe, running `python -m grpo ...` from the repository root:

    rewards:
      - {name: accuracy, weight: 1.0}
      - {name: examples.my_reward:closeness, weight: 0.5, scale: 10}
"""

import re


def closeness(prompts, completions, answer=None, *, scale=10.0, **columns):
    """Partial credit for near misses: 1 for the exact <a>answer</a>, 1/(1 + |error|/scale) otherwise."""
    out = []
    for text, ref in zip(completions, answer or [None] * len(completions)):
        if ref in (None, ""):  # no reference answer (e.g. a how-to prompt): not applicable
            out.append(None)
            continue
        m = re.search(r"<a>\s*(-?\d+)\s*</a>", text)
        out.append(1.0 / (1.0 + abs(int(m.group(1)) - float(ref)) / scale) if m else 0.0)
    return out
