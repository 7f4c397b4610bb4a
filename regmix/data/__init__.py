"""The corpus, its tokenizer and the prepared token arrays; tinypile, the demo corpus."""
