"""Model plumbing shared by every stage and by training: one card format (:mod:`.cards`), one safetensors
loader (:mod:`.loading`), one device choice (:mod:`.device`) and every network as a top-level class
(:mod:`.networks`).

Layer: above ``core`` and ``io``, below ``stages``. :mod:`.networks` imports torch when imported; the
other modules import it only inside functions, so ``vertebral-fracture --help`` stays fast.
"""
