"""The HTTP gateway: Elasticsearch's trained-model REST API (``/_ml/trained_models/...``) in
front of a cluster, built on ``mlfleet.AsyncClient``. ``mlfleet gateway --listen http://HOST:PORT
--coordinator tcp://...``; see docs/gateway.md.

    esapi    endpoints, parameters, error bodies (pure)
    keys     API keys with roles, the keys file
    server   the aiohttp daemon and the endpoints' handlers
    upload   model upload in base64 parts, vocabularies
    openapi  the OpenAPI document served at /_mlfleet/openapi.json
"""
