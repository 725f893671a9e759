"""The performance suite behind `trainformer bench`.

Every figure is measured against a peer in the same run (house style 14):
`peak` (matmul FLOP/s, the MFU denominator), `models` (training step, ours vs
Hugging Face), `realdata` (useful tokens/s on Tatoeba), `decode` (translation
and chat generation), `scaling` (sequence length, batch size, DDP). `suite`
runs the sections, `report` writes JSON, Markdown and plots.
"""
