"""URLs as django-oauth-toolkit's documentation lays them out: the toolkit under
``/o/`` (so the issuer has a path), its RFC 8414 metadata also at the server root
(the path-component form ``/.well-known/oauth-authorization-server/o``), and
Django's own login page for the person."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import include, path
from oauth2_provider import urls as oauth2_urls

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("", include((oauth2_urls.metadata_urlpatterns, "oauth2_metadata"))),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
]
