"""One decorator idiom for every table of named things (backbones, plugins, KD losses)."""
import inspect

from .errors import ConfigError, did_you_mean


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._table = {}

    def register(self, name=None):
        def deco(obj):
            key = name or obj.__name__
            if key in self._table and self._table[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice ({self._table[key]} and {obj})")
            self._table[key] = obj
            return obj
        return deco

    def get(self, name):
        if name not in self._table:
            suggestion = did_you_mean(name, self._table, cutoff=0.4)
            raise ConfigError(f"unknown {self.kind} '{name}'{suggestion} (known: {', '.join(sorted(self._table))})")
        return self._table[name]

    def build(self, name, **kwargs):
        """Construct by name; a keyword the constructor does not take is a ConfigError naming it."""
        obj = self.get(name)
        check_kwargs(obj, kwargs, f"{self.kind} '{name}'")
        return obj(**kwargs)

    def names(self):
        return sorted(self._table)

    def __contains__(self, name):
        return name in self._table


def check_kwargs(fn, kwargs, what):
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [n for n, p in sig.parameters.items() if n != "self" and p.kind != p.VAR_POSITIONAL]
    for key in kwargs:
        if key not in allowed:
            suggestion = did_you_mean(key, allowed)
            raise ConfigError(f"{what} takes no parameter '{key}'{suggestion} (it takes: {', '.join(allowed)})")
