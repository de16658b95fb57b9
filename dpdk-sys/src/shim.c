#include <rte_config.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_cycles.h>
#include <rte_lcore.h>
#include "shim.h"

int rte_errno_(void) { return rte_errno; }
uint16_t rte_eth_rx_burst_(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
                           uint16_t nb_pkts) {
    return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}
uint16_t rte_eth_tx_burst_(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
                           uint16_t nb_pkts) {
    return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}
struct rte_mbuf *rte_pktmbuf_alloc_(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }
void rte_pktmbuf_free_(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
char *rte_pktmbuf_append_(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }
void *rte_pktmbuf_mtod_(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }
uint16_t rte_pktmbuf_data_len_(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }
