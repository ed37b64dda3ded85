#!/usr/bin/env python3
"""Reference renderings of transformers' apply_chat_template(continue_final_message=True) for
tests/data/tiny-moe/text/continue-golden.json (ChatTemplate::continue_final_message, tests/unit/test_chat_template.cpp).

Usage (where transformers is installed, e.g. the GPU host): tools/continue_ref_dump.py OUT.json NAME=TEMPLATE.jinja...
The tokenizer is the tiny model's (tests/data/tiny-moe/text/tokenizer); only the rendered strings and errors are
kept (the Qwen templates themselves are not stored: tests read them from ../shared)."""
import json
import sys

from transformers import PreTrainedTokenizerFast

CASES = [
    ("plain", [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is"}], {}),
    ("trailing space", [{"role": "user", "content": "List them."}, {"role": "assistant", "content": "Sure, here:  "}], {}),
    ("leading newline", [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "\n```python\n"}], {}),
    ("json prefill", [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "Name a color."},
                      {"role": "assistant", "content": "{"}], {}),
    ("with reasoning", [{"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "Because", "reasoning_content": "Think first."}], {}),
    ("parts", [{"role": "user", "content": "Go on"},
               {"role": "assistant", "content": [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "part two"}]}], {}),
    ("multi-turn", [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "Continuing a2"}], {}),
    ("repeated text", [{"role": "user", "content": "same"}, {"role": "assistant", "content": "same"}], {}),
    ("thinking off", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
     {"enable_thinking": False}),
    ("final user message", [{"role": "user", "content": "Tell me a story about"}], {}),
    ("empty", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}], {}),
]


def main():
    out_path, specs = sys.argv[1], sys.argv[2:]
    tok = PreTrainedTokenizerFast(tokenizer_file="tests/data/tiny-moe/text/tokenizer/tokenizer.json")
    cases = []
    for spec in specs:
        name, path = spec.split("=", 1)
        src = open(path, encoding="utf-8").read()
        for case, messages, kwargs in CASES:
            rendered, error = None, None
            try:
                rendered = tok.apply_chat_template(messages, chat_template=src, tokenize=False,
                                                   add_generation_prompt=False, continue_final_message=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - the error is the expected output
                error = f"{type(e).__name__}: {e}"
            cases.append({"template": name, "name": case, "messages": messages, "kwargs": kwargs,
                          "rendered": rendered, "error": error})
    import transformers
    json.dump({"transformers": transformers.__version__, "cases": cases}, open(out_path, "w"), indent=1,
              ensure_ascii=False)
    print(f"{len(cases)} cases, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
