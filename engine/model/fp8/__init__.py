"""fp8 training: the recipes (delayed, tensorwise, blockwise, mxfp8), their exact emulation in PyTorch,
and Transformer Engine on CUDA.

    quantize.py   formats, TE's scale rules, per-tensor / block / MX quantisation, the fp8 GEMM
    recipes.py    each recipe's quantisers for the three tensors of a linear layer; delayed scaling's state
    emulation.py  the emulated fp8 linear (autograd) and the conversion of a model's decoder GEMMs
    backend.py    which path runs (Transformer Engine or the emulation) and what hardware runs which recipe
    te.py         the decoder's linear layers as Transformer Engine modules (imported only where TE is)
    training.py   Fp8Training: what the trainer calls (convert, forward context, step update, checkpoint)
"""
