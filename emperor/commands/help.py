"""help [VERB]: the documentation of every verb, or of one."""

from emperor.commands import VERBS, module_for, names_arg


def execute(emperor, args, peer):
    verbs = names_arg(args) or list(VERBS)
    return {verb: (module_for(verb).__doc__ or "").strip() for verb in verbs}
