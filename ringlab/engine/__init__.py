"""The engine: attention, dilated attention and the ring, forward and backward. Imports torch alone.

    kernels, merge, autograd      one block of attention; the LSE merge; the autograd Function
    dilation, dilated             LongNet's geometry; dilated attention on one device
    layout, config, comm          how a sequence is sharded; a ring call's options; the transfers
    ring, ring_dilated            the per-rank generators and the public ring functions
    ulysses                       heads over a Ulysses group (all-to-all), alone or with a ring
    checks, nn, trace, launch     argument checks; modules for models; event traces; P ranks from Python
"""
