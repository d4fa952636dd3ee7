"""Several instances behind one address (README: Several instances and stored state): the
recipes that route a stored response's requests to the instance whose name is in its id, run
with nginx 1.22 and HAProxy 2.6 (Debian) in front of two instances on loopback.

The balancers' default is round robin, so a request the recipe did not route would reach the
other instance every second time, and that instance answers 404 (another instance's id).
"""
import openai
import pytest

import fake_upstream
from conftest import HAPROXY_HEAD, NGINX_HEAD, need_tool

NGINX_CONF = NGINX_HEAD + """
    map $uri $claude_backend {
        ~^/(v1/)?(responses|conversations)/(resp|conv)_a_   claude_a;
        ~^/(v1/)?(responses|conversations)/(resp|conv)_b_   claude_b;
        default                                             claude_proxies;
    }
    upstream claude_a { server 127.0.0.1:%(p1)d; }
    upstream claude_b { server 127.0.0.1:%(p2)d; }
    upstream claude_proxies {
        server 127.0.0.1:%(p1)d;
        server 127.0.0.1:%(p2)d;
    }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://$claude_backend;
            proxy_set_header Host $host;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 660s;
        }
    }
}
"""

HAPROXY_CONF = HAPROXY_HEAD + r"""
    option http-buffer-request
    acl to_a path_reg ^/(v1/)?(responses|conversations)/(resp|conv)_a_
    acl to_a req.body -m reg "\"(previous_response_id|conversation)\"[[:space:]]*:[[:space:]]*([{][[:space:]]*\"id\"[[:space:]]*:[[:space:]]*)?\"(resp|conv)_a_"
    acl to_b path_reg ^/(v1/)?(responses|conversations)/(resp|conv)_b_
    acl to_b req.body -m reg "\"(previous_response_id|conversation)\"[[:space:]]*:[[:space:]]*([{][[:space:]]*\"id\"[[:space:]]*:[[:space:]]*)?\"(resp|conv)_b_"
    use_backend claude_a if to_a
    use_backend claude_b if to_b
    default_backend claude_proxies
backend claude_a
    server a 127.0.0.1:%(p1)d
backend claude_b
    server b 127.0.0.1:%(p2)d
backend claude_proxies
    balance roundrobin
    server a 127.0.0.1:%(p1)d
    server b 127.0.0.1:%(p2)d
"""


@pytest.fixture
def fronted(make_proxy, balancer, tmp_path):
    """fronted(argv, conf) -> an SDK client on a balancer in front of instances a and b."""

    def make(argv, conf):
        need_tool(argv[0])
        p1 = make_proxy(CLAUDE_PROXY_INSTANCE="a", CLAUDE_PROXY_POOL_SIZE=0,
                        CLAUDE_PROXY_STATE_DIR=tmp_path / "a")
        p2 = make_proxy(CLAUDE_PROXY_INSTANCE="b", CLAUDE_PROXY_POOL_SIZE=0,
                        CLAUDE_PROXY_STATE_DIR=tmp_path / "b")
        url = balancer(argv, conf, p1=p1.port, p2=p2.port)
        return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), (p1, p2)

    return make


def made_on_both(c, upstream):
    """Two stored responses made through the balancer, one on each instance."""
    made = {}
    for i in range(6):
        upstream.push(fake_upstream.text("Answer %d." % i))
        r = c.responses.create(model="sonnet", input="Question %d." % i)
        made.setdefault(r.id.split("_")[1], r)
        if len(made) == 2:
            return made
    raise AssertionError("round robin never reached both instances: %s" % sorted(made))


def urls_reach_their_instance(c, made):
    for name, r in made.items():
        for _ in range(4):                        # round robin alone would miss every other time
            assert c.responses.retrieve(r.id).output_text == r.output_text
            assert [i.content[0].text for i in c.responses.input_items.list(r.id)] == \
                [r.output_text.replace("Answer", "Question")]
    for name in ("a", "b"):
        conv = None
        while conv is None or not conv.id.startswith("conv_%s_" % name):
            conv = c.conversations.create(metadata={"n": name})
        for _ in range(4):
            assert c.conversations.retrieve(conv.id).metadata == {"n": name}
            assert c.conversations.items.create(conv.id, items=[
                {"role": "user", "content": "note"}]).data[0].type == "message"
        assert c.conversations.delete(conv.id).deleted
    for r in made.values():
        c.responses.delete(r.id)


def test_nginx_routes_a_stored_ids_url_to_its_instance(fronted, upstream):
    """The README's nginx recipe, run: a map on the URL sends GET, DELETE, input_items and the
    conversations routes of an id to the instance named in it (nginx cannot route on the body:
    see test_haproxy_... for previous_response_id)."""
    c, _ = fronted(["nginx", "-p", "/", "-c", "CONF", "-g", "daemon off; master_process off;"],
                   NGINX_CONF)
    urls_reach_their_instance(c, made_on_both(c, upstream))


def test_haproxy_routes_urls_and_previous_response_id_to_the_instance(fronted, upstream):
    """The README's HAProxy recipe, run: the URL as above, and the body's previous_response_id
    or conversation (option http-buffer-request, req.body) for a chained create."""
    c, (p1, p2) = fronted(["haproxy", "-db", "-f", "CONF"], HAPROXY_CONF)
    made = made_on_both(c, upstream)
    urls_reach_their_instance(c, dict(made))
    for name, first in made_on_both(c, upstream).items():
        prev = first
        for turn in range(3):                      # a chain stays on the instance that began it
            upstream.push(fake_upstream.text("%s turn %d." % (name, turn)))
            prev = c.responses.create(model="sonnet", input="go on", previous_response_id=prev.id)
            assert prev.id.startswith("resp_%s_" % name) and prev.output_text == "%s turn %d." % (name, turn)
        conv = None
        while conv is None or not conv.id.startswith("conv_%s_" % name):
            conv = c.conversations.create()
        for body in ({"conversation": conv.id}, {"conversation": {"id": conv.id}}):
            upstream.push(fake_upstream.text("in %s" % name))
            assert c.responses.create(model="sonnet", input="hi", **body).output_text == "in %s" % name
    assert " 404 " not in p1.log and " 404 " not in p2.log      # nothing reached the other one
