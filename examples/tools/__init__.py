"""The toy tool world: 3-digit + and -, 2-digit x, with a calculator tool (README, "Tools / multi-turn").

- `examples.tools.calculator`: the tool (`calc`, a plain Python function) and the call syntax the toy
  tokenizer can write (`ToyToolEnv`, the built-in `tools` environment with ``<t>calc:347x582</t>`` calls);
- `examples.tools.build_data`: the deterministic data generator (the JSONL files beside it) and the world's rules;
- `recipes/tools_quickstart.yaml`: SFT -> GRPO -> eval on the shipped tiny base model.
"""
