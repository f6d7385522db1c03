"""Label selectors with Kubernetes semantics: parsing, validation, matching and canonical forms.

A selector is the AND of its `matchLabels` (each key present with exactly that value) and
its `matchExpressions` (In, NotIn, Exists, DoesNotExist). NotIn also matches labels without
the key; an empty selector matches everything.

Two input forms are accepted:
- the dict form `{"matchLabels": {...}, "matchExpressions": [{"key", "operator", "values"}]}`
  (snake_case `match_labels` / `match_expressions` too), as stored and sent over the API;
- the short string form `env=prod,tier in (edge,core),!legacy`, with `key==value`,
  `key!=value` (NotIn with one value), `key notin (a,b)`, `key` (Exists) and `!key`
  (DoesNotExist). Label values can hold any text, so a value that is empty or contains
  whitespace or one of `,()=!"` is written in double quotes, with `\\` escaping `"` and `\\`.

Pure Python, in two modules: `selector` holds the selector itself (`LabelSelector`,
`Requirement`, the key and value rules, matching, the canonical forms), `parsing` reads
the two input forms (`parse_selector`). The database form of a selector is in
`fleet.selector_queries`.
"""
