"""Django settings of the test provider: stock django-oauth-toolkit, configured only
through its documented ``OAUTH2_PROVIDER`` settings.

``serve.py`` sets the ``DOT_*`` environment variables before Django loads this
module: the database file, the RSA signing key it generated, and the lifetimes
a test asked for.
"""

from __future__ import annotations

import os

BASE_DIR = os.path.dirname(os.path.abspath(__file__))
SECRET_KEY = os.environ["DOT_SECRET_KEY"]
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "dotprovider.urls"
USE_TZ = True
LOGIN_URL = "/accounts/login/"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
    "dotprovider",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DOT_DATABASE"]}
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Fast hashing: the test users' passwords are not secrets.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Server errors (with tracebacks) go to stderr, which the fixture keeps for its
# failure messages; request lines are not logged at all.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR"}},
}

# django-oauth-toolkit, documented settings only
# (https://django-oauth-toolkit.readthedocs.io/en/latest/settings.html).
OAUTH2_PROVIDER = {
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": os.environ["DOT_RSA_PRIVATE_KEY"],
    "PKCE_REQUIRED": True,
    "ROTATE_REFRESH_TOKEN": True,
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("DOT_ACCESS_TOKEN_TTL", "3600")),
    "REFRESH_TOKEN_EXPIRE_SECONDS": int(os.environ.get("DOT_REFRESH_TOKEN_TTL", "1209600")),
    "DEVICE_FLOW_INTERVAL": int(os.environ.get("DOT_DEVICE_INTERVAL", "1")),
    "OAUTH_DEVICE_VERIFICATION_URI": os.environ["DOT_DEVICE_VERIFICATION_URI"],
    "SCOPES": {
        "openid": "OpenID Connect",
        "profile": "Your profile",
        "email": "Your email address",
        "offline_access": "Stay signed in",
        "compozy:read": "Read Compozy resources",
        "compozy:write": "Change Compozy resources",
        "compozy:deploy": "Deploy",
    },
    "DEFAULT_SCOPES": ["openid"],
}
