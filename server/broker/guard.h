/* What provisioning_guard.c (checks, plugin lifecycle) and guard_control.c (the control
 * topic) share: one struct guard per plugin instance, i.e. per listener. */
#ifndef GUARD_H
#define GUARD_H

#include <stddef.h>

#include <mosquitto_plugin.h>

#define CONTROL_TOPIC "$CONTROL/provisioning-guard/v1"
#define RESPONSE_TOPIC "$CONTROL/provisioning-guard/v1/response"
#define MAX_ID 64 /* CLIENT_ID_RE */

enum mode { MODE_SERVER, MODE_OPERATIONAL, MODE_PROVISIONING };

struct guard {
	mosquitto_plugin_id_t *pid;
	enum mode mode;
	char **pending_kicks; /* "o<id>"/"b<id>", run in the reload event */
	size_t kick_count;
	char **pending_tokens;
	size_t token_count;
	char *rights_file; /* operational: the file the rights table is read from */
};

/* Successful reads of the rights file (start and reloads), for "stats". */
extern unsigned long guard_file_loads;

/* MOSQ_EVT_CONTROL and MOSQ_EVT_RELOAD callbacks of the server listener's instance. */
int guard_on_control(int event, void *event_data, void *userdata);
int guard_on_reload(int event, void *event_data, void *userdata);
void guard_clear_pending(struct guard *guard);

#endif
