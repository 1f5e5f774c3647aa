"""A small procedural world (coloured, textured shapes) with captions, held-out concepts and trained judges.

``world`` generates images and captions with numpy and PIL; ``judges`` holds the small CNN classifiers that tell
what an image shows. Neither imports diffusers or transformers.
"""
