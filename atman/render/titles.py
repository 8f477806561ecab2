"""Which method produced an explanation, in words, for the headings of every view.

>>> from atman.render.titles import view_title
>>> view_title({"method": "integrated-gradients"})
'Integrated Gradients explanation'
"""

from __future__ import annotations

METHOD_NAMES = {
    "atman": "AtMan",
    "integrated-gradients": "Integrated Gradients",
    "input-x-gradient": "Input x Gradient",
    "saliency": "Saliency",
    "feature-ablation": "Feature ablation",
    "occlusion": "Occlusion",
    "random": "Random scores",
    "attention-rollout": "Attention rollout",
    "chefer": "Chefer et al.",
    "attnlrp": "AttnLRP",
}


def method_name(settings: dict[str, object]) -> str:
    """The display name of the method that produced an explanation, from its ``settings``.

    AtMan's explainers record no method; comparison methods record theirs under ``"method"``.

    >>> method_name({}), method_name({"method": "integrated-gradients"}), method_name({"method": "new-one"})
    ('AtMan', 'Integrated Gradients', 'new-one')
    """
    method = str(settings.get("method", "atman"))
    return METHOD_NAMES.get(method, method)


def view_title(settings: dict[str, object]) -> str:
    """The heading of a view: ``"<method> explanation"``.

    >>> view_title({"method": "chefer"})
    'Chefer et al. explanation'
    """
    return f"{method_name(settings)} explanation"
