"""`wscluster nginx-conf`: both forms log in a format of their own, without the query string
(``?token=`` carries a JWT for clients that use it) nor the Referer (whose URL may carry one).
nginx itself writes such a log in tests/cluster/test_nginx_log.py."""

from __future__ import annotations

import re

import pytest

from wscluster import nginx

from .test_nginx_conf import D, conf

# the variables that hold the query string, a whole URL that may have one, or a header that
# may carry a token (Authorization, Sec-WebSocket-Protocol, cookies)
LEAKY = {"$request", "$request_uri", "$args", "$query_string", "$is_args", "$request_body",
         "$http_referer", "$http_authorization", "$http_sec_websocket_protocol", "$http_cookie"}
LEAKY_PREFIXES = ("$arg_", "$cookie_", "$sent_http_", "$upstream_http_")


def _format(http: D) -> tuple[str, str]:
    (fmt,) = http.all("log_format")
    name, *parts = fmt.args
    return name, "".join(parts)


@pytest.mark.parametrize("standalone", [False, True])
def test_access_log_format_has_no_query_string(standalone: bool) -> None:
    text, http, server = conf(2, standalone=standalone)
    name, body = _format(http)
    assert name == nginx.LOG_FORMAT and name.startswith("wscluster")
    variables = [v.replace("{", "") for v in re.findall(r"\$\{?[a-z_0-9]+", body)]
    assert variables, body
    for var in variables:
        assert var not in LEAKY and not var.startswith(LEAKY_PREFIXES), var
    assert "$request_method" in body and "$uri" in body and "$status" in body
    # the combined format's layout, the request line without its query, "-" for the Referer
    assert body == (
        '$remote_addr - $remote_user [$time_local] "$request_method $uri $server_protocol" '
        '$status $body_bytes_sent "-" "$http_user_agent"'
    )
    # every access_log there is uses it; the one in force for the server is there
    logs = [d for d in [*(http.block or []), *server.walk()] if d.name == "access_log"]
    assert logs and all(d.args[1:] == [name] for d in logs), logs
    if standalone:  # the http block's own, relative to nginx -p DIR
        assert http.one("access_log").args == ["access.log", name]
        assert not server.all("access_log")
    else:  # the host's http {} may log in "combined", with $request: the server overrides it
        assert server.one("access_log").args == ["/var/log/nginx/access.log", name]
    assert "query string" in text  # a comment says why


def test_log_format_name_is_unique_to_wscluster() -> None:
    """A conf.d snippet shares the http context with the distribution's own formats
    ("combined", "main"): nginx refuses a duplicate log_format name."""
    assert nginx.LOG_FORMAT not in ("combined", "main", "default")
