"""CoDA trainer: the model, the diffusion objective, the training loop, the sampler and the server.

Shape suffixes. An array's name ends in its axes, `x_BxLxD` is batch × length × width; each letter
means one thing in every module (a digit is a literal size: `probs_3`, `split_Bx2`, `freqs_BxLxH2`
= H/2):

    B  batch rows                       D  model width (hidden size)
    L  query length (tokens a forward   A  query (attention) heads
       computes)                        K  key/value heads
    S  key/value length (past + own)    G  query heads per key/value head (A / K)
    P  past (cached) length             H  head dim
    T  sampling canvas length (pads,    F  MLP width
       prompt, new tokens, suffix)      V  vocabulary
    W  sampling block width             I, O  a dense kernel's input, output features
    Q  a cached step's query window     Z  stacked layers
       (W + 1, the logit shift)         C  candidate S3 block sizes (masking)
    N  new (generated) tokens per row   J  masking blocks per row
    U  denoising steps (of a block, or of the whole run)
"""
