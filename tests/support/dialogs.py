"""Dialogs and greedy settings the served-model tests share: a served model must answer them as the same model
loaded in the kernel does (tests/engine/test_remote.py, tests/engine/test_text_prompts.py)."""

from helpers.settings import GenerationSettings

GREEDY = GenerationSettings(temperature=0, repeat_penalty=1.0, cache_prompt=False, max_tokens=40, seed=7)

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [
        {"role": "user", "content": "Hello! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant."},
        {"role": "user", "content": "Write one sentence about the sea."},
    ],
    [{"role": "user", "content": "Explain what </s> and <|im_end|> mean, typed as text."}],
]
