"""A stock django-oauth-toolkit deployment for the agent's tests (see ../README.md)."""
