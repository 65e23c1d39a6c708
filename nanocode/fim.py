"""Fill-in-the-middle (FIM): teach a left-to-right model to fill a hole in a file.

A document is cut at two random character positions into prefix, middle and suffix, and rearranged
so that the middle comes last (docs/DESIGN.md):

    PSM: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM: <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle

The cut happens on characters (a Python str indexes code points), so it never splits a UTF-8
sequence; tokenization happens afterwards, piece by piece. We return the pieces (special-token ids
and plain strings) instead of a string with the special-token text in it, so a document that happens
to contain the text "<|fim_middle|>" can never be confused with the real token.

Why these defaults (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle"): at FIM rates up to 90% the left-to-right loss was unchanged while infilling was learned,
so 50% costs ordinary completion nothing; mixing PSM and SPM 50/50 trained better than either alone;
and cuts at uniformly random characters (not lines or tokens) let the model learn to finish a
half-written token. SPM puts <|fim_prefix|> first, as the paper's variant does, so that every FIM
document starts with the same token and the second one tells the layouts apart.

Randomness comes from the `random.Random` the caller passes in; the dataloader seeds one per
(seed, epoch, document chunk), so the same document gets the same cut wherever a run resumes.
"""

import random

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = 9, 10, 11  # ids fixed by docs/DESIGN.md (the token table)


def apply_fim(text: str, rng: random.Random, fim_rate: float = 0.5, spm_rate: float = 0.5):
    """Return the pieces of one training document: a list of str (ordinary text) and int (special
    ids). With probability 1 - fim_rate the document is left alone: [text]."""
    if rng.random() >= fim_rate:
        return [text]
    # randint includes both ends, so any of the three pieces may be empty
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    prefix, middle, suffix = text[:i], text[i:j], text[j:]
    if rng.random() < spm_rate:
        return [FIM_PREFIX, FIM_SUFFIX, suffix, FIM_MIDDLE, prefix, middle]
    return [FIM_PREFIX, prefix, FIM_SUFFIX, suffix, FIM_MIDDLE, middle]
