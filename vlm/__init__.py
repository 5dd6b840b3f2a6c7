"""perceiver-vlm's vision-language models: frozen open_clip tower -> resampler -> any HF causal LM."""
