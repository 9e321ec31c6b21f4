"""compozy_client: the `compozy` CLI and the library local tools use to get tokens.

Importing this package is cheap: the public names load on first use.
"""
