"""Real servers for tests and benchmarks, each started on a free port and stopped after: the iPaaS.com
hook (``hookserver``), Kafka (``kafkaserver``: tansu; ``apachekafka``: Apache Kafka 4), Pub/Sub
(``pstestserver``), Redis (``redisserver``), commercetools (``ctmockserver``). Each module is also a pytest
plugin of its fixtures.
"""
