/* One-line wrappers around DPDK's static inline functions and macros, so that
 * Rust can link to them. Each is named after what it wraps, with a trailing
 * underscore; src/lib.rs re-exports them under the DPDK name. */
#ifndef DSAN_DPDK_SHIM_H
#define DSAN_DPDK_SHIM_H
#include <stdint.h>
struct rte_mbuf;
struct rte_mempool;

int rte_errno_(void);
uint16_t rte_eth_rx_burst_(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **rx_pkts,
                           uint16_t nb_pkts);
uint16_t rte_eth_tx_burst_(uint16_t port_id, uint16_t queue_id, struct rte_mbuf **tx_pkts,
                           uint16_t nb_pkts);
struct rte_mbuf *rte_pktmbuf_alloc_(struct rte_mempool *mp);
void rte_pktmbuf_free_(struct rte_mbuf *m);
char *rte_pktmbuf_append_(struct rte_mbuf *m, uint16_t len);
void *rte_pktmbuf_mtod_(struct rte_mbuf *m);
uint16_t rte_pktmbuf_data_len_(const struct rte_mbuf *m);
#endif
