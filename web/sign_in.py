"""The sign-in page and sign-out, one piece of code behind both doors: ``/login`` takes any live
token, ``/admin/login`` only an admin token (:func:`web.auth.sign_in` does the signing in).
Each door is a :class:`SignInPage`, which says who may pass, what the page calls itself and
where a browser lands without a ``?next``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from web.auth import safe_next, sign_in, sign_out
from web.forms import AdminSignInForm, SignInForm, attach_error


@dataclass(frozen=True)
class SignInPage:
    admin_only: bool
    title: str
    form: type[SignInForm]
    # Where a browser goes once signed in, when ?next names no page of this site.
    landing: str
    refused: str


ANY_TOKEN = SignInPage(
    admin_only=False,
    title="Sign in",
    form=SignInForm,
    landing="pages.index",
    refused="This is not a live token.",
)
ADMIN_TOKEN = SignInPage(
    admin_only=True,
    title="Admin sign-in",
    form=AdminSignInForm,
    landing="admin.runs",
    refused="This is not a live admin token.",
)


def sign_in_page(page: SignInPage) -> Any:
    """The form, and on a valid POST the sign-in and a 303 to ``?next`` (a page of this site)."""
    form = page.form()
    if form.validate_on_submit():
        if sign_in(form.token.data or "", admin_only=page.admin_only) is not None:
            next_page = safe_next(request.args.get("next"), url_for(page.landing))
            return redirect(next_page, code=303)
        attach_error(form, "token", page.refused)
    status = 401 if request.method == "POST" else 200
    return render_template("login.html", form=form, page=page), status


def sign_out_page() -> BaseResponse:
    sign_out()
    return redirect(url_for("pages.index"), code=303)
