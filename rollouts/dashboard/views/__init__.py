"""Operator pages, one module per page: fleet list (`fleet`), agent (`agent`), configurations
(`configurations`), rollouts and the creation form (`rollouts`), certificate requests
(`certificates`); what they share (the login and role check) is in `shared`.

Thin over the selectors and services the API uses. Every page needs a role that can read
(viewer, operator, staff); every POST needs the operator role and is refused with 403
otherwise, whether or not the page showed a button. Live parts are HTML fragments the page
polls (`?fragment=1`), so nothing needs a front-end build.
"""
